"""`python -m moejax.selfcheck [--json] [--quick]`: does every kernel work on this backend, and how fast.

On whatever backend JAX finds (CPU, GPU, TPU), with no data and no config file:
1. every attention implementation the backend supports (`moejax.model.attention_impl.ATTENTION_IMPLS`,
   Pallas kernels in interpret mode where they are not native) against the dense `xla` reference,
   forward and gradients, in float32 and bfloat16, with the tolerances in TOLERANCES;
2. every grouped-matmul implementation (`moejax.model.dispatch.GROUPED_FFNS`, whatever is registered)
   against `ragged_dot`, forward and gradients, both dtypes;
3. what `auto` picks for attention here;
4. the HLO of `jax.lax.ragged_dot` compiled here: a real ragged dot, or a dense masked dot (G x FLOPs);
5. one timed train step per runnable attention implementation on a small Mixtral-shaped stack
   (`moejax.bench.run`: tokens/s, MFU, peak memory).
Exit code 1 when a check fails. `--json`: the last stdout line is the whole report as one object.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moejax import config as config_lib
from moejax.errors import run_cli
from moejax.model import attention_impl as ai
from moejax.model import dispatch

# Max |got - want| / (max |want| + 1e-6), per output / gradient: float32 is rounding-level; bfloat16
# holds ~3 significant digits, and the kernels round probabilities at different points.
TOLERANCES = {"float32": 1e-4, "bfloat16": 5e-2}


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.max(np.abs(got - want)) / (np.max(np.abs(want)) + 1e-6))


def _attn_case(dtype, t: int):
    rng = np.random.default_rng(0)
    b, n, kv, hd = 1, 4, 2, 64
    q = jnp.asarray(rng.normal(size=(b, t, n, hd)), dtype)
    k = jnp.asarray(rng.normal(size=(b, t, kv, hd)), dtype)
    v = jnp.asarray(rng.normal(size=(b, t, kv, hd)), dtype)
    cut = t * 3 // 5  # two packed examples
    seg = jnp.asarray(np.r_[np.ones(cut), 2 * np.ones(t - cut)][None], jnp.int32)
    pos = jnp.asarray(np.r_[np.arange(cut), np.arange(t - cut)][None], jnp.int32)
    return q, k, v, seg, pos


def check_attention(t: int, block: int, windows=(None, 32)) -> list[dict[str, Any]]:
    be = ai.backend()
    rows = []
    for dname, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        q, k, v, seg, pos = _attn_case(dtype, t)
        for window in windows:
            def run(name):
                spec = ai.AttnSpec(name, q.shape[-1] ** -0.5, window, block, block)
                fn = lambda q, k, v: ai.ATTENTION_IMPLS.get(name).fn(q, k, v, seg, pos, spec)
                loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) ** 2)
                return jax.jit(lambda *a: (fn(*a), jax.grad(loss, argnums=(0, 1, 2))(*a)))(q, k, v)
            ref = run("xla")
            spec = ai.AttnSpec("auto", 1.0, window, block, block)
            for name, why in ai.supported(be, dtype, t, spec, q.shape[-1], v.shape[-1]).items():
                row = {"impl": name, "dtype": dname, "window": window, "seq": t}
                if name == "xla":
                    continue
                if why is not None:
                    rows.append({**row, "status": "unsupported", "why": why})
                    continue
                t0 = time.perf_counter()
                try:
                    out, grads = run(name)
                except Exception as e:  # noqa: BLE001 - a kernel that fails here is the finding
                    rows.append({**row, "status": "error", "why": f"{type(e).__name__}: {e}"[:300]})
                    continue
                err = max([_rel(out, ref[0])] + [_rel(g, r) for g, r in zip(grads, ref[1])])
                ok = err <= TOLERANCES[dname]
                rows.append({**row, "status": "ok" if ok else "mismatch", "max_rel_err": err,
                             "tolerance": TOLERANCES[dname], "seconds": time.perf_counter() - t0,
                             "interpret": be not in ai.ATTENTION_IMPLS.get(name).backends})
    return rows


def check_grouped_ffns(m: int = 64) -> list[dict[str, Any]]:
    """Each GROUPED_FFNS entry vs ragged_dot: y = swiglu over expert-sorted rows."""
    rng = np.random.default_rng(0)
    e, d, f = 4, 32, 48
    sizes = jnp.asarray([20, 0, 28, 16], jnp.int32)
    rows = []
    for dname, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        x = jnp.asarray(rng.normal(size=(m, d)), dtype)
        w = dispatch.ExpertWeights(*(jnp.asarray(rng.normal(size=s) * 0.2, dtype)
                                     for s in ((e, d, f), (e, d, f), (e, f, d))))

        def run(name):
            fn = dispatch.GROUPED_FFNS.get(name)
            loss = lambda x, w: jnp.sum(fn(x, w, sizes, 16).astype(jnp.float32) ** 2)
            return jax.jit(lambda x, w: (fn(x, w, sizes, 16), jax.grad(loss, argnums=(0, 1))(x, w)))(x, w)

        ref = run("ragged_dot")
        for name in dispatch.GROUPED_FFNS.names():
            if name == "ragged_dot":
                continue
            row = {"impl": name, "dtype": dname}
            try:
                out, (gx, gw) = run(name)
            except Exception as e:  # noqa: BLE001
                rows.append({**row, "status": "error", "why": f"{type(e).__name__}: {e}"[:300]})
                continue
            grads = [gx, *gw]
            refs = [ref[1][0], *ref[1][1]]
            err = max([_rel(out, ref[0])] + [_rel(g, r) for g, r in zip(grads, refs)])
            rows.append({**row, "status": "ok" if err <= TOLERANCES[dname] else "mismatch",
                         "max_rel_err": err, "tolerance": TOLERANCES[dname]})
    return rows


def ragged_dot_form() -> dict[str, Any]:
    """Compile a ragged_dot here and read the optimised HLO: which form did it lower to?"""
    g, m, k, n = 4, 64, 32, 48
    lhs, rhs = jnp.ones((m, k), jnp.float32), jnp.ones((g, k, n), jnp.float32)
    sizes = jnp.asarray([16] * g, jnp.int32)
    hlo = jax.jit(jax.lax.ragged_dot).lower(lhs, rhs, sizes).compile().as_text()
    hlo = re.sub(r", metadata=\{[^}]*\}", "", hlo)  # op names mention "ragged_dot" whatever the form
    if re.search(r' ragged-dot\(|custom_call_target="[^"]*(ragged|gmm|grouped)', hlo):
        form = "ragged dot (a grouped matmul kernel)"
    else:
        dense = re.search(r"f32\[%d,%d,%d\]" % (g, m, k), hlo) or re.search(r"f32\[%d,%d,%d\]" % (g, m, n), hlo)
        form = "dense masked dot (G x the FLOPs)" if dense else "other (see hlo_excerpt)"
    ops = sorted(set(re.findall(r"= \S+ (\w[\w-]*)\(", hlo)))
    return {"form": form, "ops": ops, "hlo_excerpt": hlo[:1500]}


def bench_attention(impls: list[str], quick: bool) -> list[dict[str, Any]]:
    from moejax import bench
    seq = 128 if quick else 512
    base = ["model.vocab_size=512", "model.d_model=128", "model.n_layers=2", "model.n_heads=4",
            "model.n_kv_heads=2", "model.head_dim=64", "model.d_ff=256", "model.moe.num_experts=8",
            "model.moe.top_k=2", "model.moe.d_expert=128", "model.moe.tile_size=32", "train.batch_size=1",
            f"data.seq_len={seq}", "model.attention_block_q=128", "model.attention_block_kv=128",
            "mesh.data=1"]
    rows = []
    for name in impls:
        cfg = config_lib.load(None, base + [f"model.attention_impl={name}"])
        try:
            r = bench.run(cfg, steps=1 if quick else 3, warmup=1, say=lambda m: None)
        except Exception as e:  # noqa: BLE001
            rows.append({"impl": name, "status": "error", "why": f"{type(e).__name__}: {e}"[:300]})
            continue
        rows.append({"impl": name, "status": "ok", "seq_len": seq, "tokens_per_sec": r["tokens_per_sec"],
                     "mfu": r["mfu"], "peak_memory_bytes": r["peak_memory_bytes"],
                     "step_time_s": r["step_time_s"]})
    return rows


def selfcheck(quick: bool = False, say=print) -> dict[str, Any]:
    be = ai.backend()
    t = 128  # the smallest sequence splash runs at (its key block is a multiple of 128)
    say(f"selfcheck: {jax.device_count()} x {jax.devices()[0].device_kind} ({be}), jax {jax.__version__}")
    attn = check_attention(t, 128, (None,) if quick else (None, t // 4))
    for r in attn:
        say(f"  attention {r['impl']:<10} {r['dtype']:<8} window={r['window']}: {r['status']}"
            + (f" (max rel err {r['max_rel_err']:.2e} <= {r['tolerance']:g})" if "max_rel_err" in r else "")
            + (f" - {r['why']}" if "why" in r else ""))
    gmm = check_grouped_ffns()
    for r in gmm:
        say(f"  grouped FFN {r['impl']:<10} {r['dtype']:<8}: {r['status']}"
            + (f" (max rel err {r['max_rel_err']:.2e})" if "max_rel_err" in r else "")
            + (f" - {r['why']}" if "why" in r else ""))
    spec = ai.AttnSpec("auto", 1.0, None, 512, 512)
    auto = {f"seq {s}, {d}": ai.pick_auto(be, dt, s, spec, 128, 128)
            for s in (2048, 8192) for d, dt in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16))}
    say(f"  attention auto picks: {auto}")
    rd = ragged_dot_form()
    say(f"  ragged_dot lowers to: {rd['form']}")
    runnable = sorted({r["impl"] for r in attn if r["status"] == "ok"} | {"xla"})
    if quick:  # interpret-mode kernels are minutes per step on CPU; the quick bench runs native ones
        runnable = [n for n in runnable if be in ai.ATTENTION_IMPLS.get(n).backends]
    benches = bench_attention(runnable, quick)
    for r in benches:
        say(f"  train step, attention {r['impl']:<10}: " + (
            f"{r['tokens_per_sec']:,.0f} tokens/s, MFU {100 * (r['mfu'] or 0):.2f}%, peak memory "
            f"{(r['peak_memory_bytes'] or 0) / 2**20:.1f} MiB" if r["status"] == "ok" else r["why"]))
    failed = [r for r in attn + gmm + benches if r["status"] in ("error", "mismatch")]
    say(f"selfcheck: {'FAILED ' + str(len(failed)) + ' check(s)' if failed else 'all checks passed'}")
    return {"backend": be, "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__,
            "tolerances": TOLERANCES, "attention": attn, "grouped_ffn": gmm, "attention_auto": auto,
            "ragged_dot": {k: v for k, v in rd.items() if k != "hlo_excerpt"}, "bench": benches,
            "ok": not failed}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moejax.selfcheck", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="last stdout line: the report as one JSON object")
    p.add_argument("--quick", action="store_true", help="no sliding-window pass, a one-step bench of the native implementations (CI)")
    args = p.parse_args(argv)
    report = selfcheck(args.quick, say=lambda m: print(m, flush=True))
    if args.json:
        print(json.dumps(report), flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    run_cli(main)
    sys.exit(0)

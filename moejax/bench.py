"""`python -m moejax.bench --config CFG [--set key=value ...] --steps N [--json]`: how fast a config trains.

Builds the config's model, mesh and optimizer exactly as `moejax.train` does, compiles the real
jitted train step once (ahead of time), runs warm-up steps, then times N steps, each one
synchronised with the device (`block_until_ready`). The batches are random tokens of the config's
shapes (`train.batch_size` x `data.seq_len`), so no dataset or tokenizer is needed; they are placed
on the devices before the clock starts.

Reported: step time (median, min, max), tokens/s, model TFLOP/s per device (6 N_active + attention,
`moejax.flops`), MFU against the device's peak (`flops.PEAK_TFLOPS` by device kind; on CPU a quick
matmul probe; `train.peak_tflops` overrides), peak memory (the device's `memory_stats()` where the
backend keeps them, else XLA's compiled memory analysis of the step), and with `mesh.expert > 1`
the share of the step spent in all-to-all. That share is measured by timing a second compilation of
the step in which `jax.lax.all_to_all` is an identity of the same shape (same buffers, same FLOPs,
no exchange): share = (t_step - t_without) / t_step. With `--json` the last stdout line is one JSON
object (the rows of docs/benchmarks.md are made from it).

On Linux the command runs itself with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 unless GLIBC_TUNABLES is
set (or MOEJAX_BENCH_NO_HUGETLB=1): see `_reexec_with_huge_pages`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from typing import Any, Iterator

import jax
import numpy as np

from moejax import config as config_lib
from moejax import flops as flops_lib
from moejax import parallel
from moejax.config import Config
from moejax.errors import UserError, run_cli
from moejax.optim import make_optimizer
from moejax.train import create_sharded_state, jit_train_step


def synthetic_batch(cfg: Config, seed: int) -> dict[str, np.ndarray]:
    """Random tokens with the shapes and dtypes of a packed training batch (one segment per row)."""
    b, t, v = cfg.train.batch_size, cfg.data.seq_len, cfg.model.vocab_size
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, v, (b, t + 1)).astype(np.int32)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:].copy(),
            "segment_ids": np.ones((b, t), np.int32),
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
            "loss_mask": np.ones((b, t), np.float32)}


def compiled_memory_bytes(compiled) -> dict[str, int] | None:
    """XLA's static memory analysis of a compiled executable, per device: arguments + outputs +
    temporaries - the outputs that reuse donated argument buffers (aliases)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - backends without the analysis
        return None
    if m is None:
        return None
    parts = {k: int(getattr(m, f"{k}_size_in_bytes", 0)) for k in
             ("argument", "output", "alias", "temp", "generated_code")}
    parts["total"] = parts["argument"] + parts["output"] + parts["temp"] - parts["alias"]
    return parts


def device_peak_memory() -> int | None:
    """Largest `peak_bytes_in_use` over the local devices, where the backend keeps statistics."""
    peaks = []
    for d in jax.local_devices():
        try:
            stats = d.memory_stats()
        except Exception:  # noqa: BLE001
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


@contextlib.contextmanager
def without_all_to_all() -> Iterator[None]:
    """While tracing: `jax.lax.all_to_all` returns its input (split_axis == concat_axis in every
    call of moejax.model.dispatch, so the shape is the same); nothing is exchanged."""
    real = jax.lax.all_to_all
    jax.lax.all_to_all = lambda x, *a, **k: x
    try:
        yield
    finally:
        jax.lax.all_to_all = real


def _time_steps(compiled, state, batches, steps: int, warmup: int, say
                ) -> tuple[Any, list[float], list[float]]:
    """Wall time and process CPU time (all threads) of each step, each step device-synchronised."""
    for i in range(warmup):
        state, metrics = compiled(state, batches[i % len(batches)])
        jax.block_until_ready((state, metrics))
    times, cpu = [], []
    for i in range(steps):
        c0, t0 = time.process_time(), time.perf_counter()
        state, metrics = compiled(state, batches[i % len(batches)])
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        say(f"step {i + 1}/{steps}: {times[-1] * 1e3:.1f} ms (process CPU time {cpu[-1] * 1e3:.1f} ms)")
    return state, times, cpu


def run(cfg: Config, steps: int, warmup: int = 2, say=print) -> dict[str, Any]:
    """Compile, warm up and time `steps` train steps of `cfg`; returns the result record."""
    tc = cfg.train
    mesh = parallel.make_mesh(cfg)
    optimizer = make_optimizer(tc)
    graphdef, state = create_sharded_state(cfg, mesh, optimizer)
    batches = [parallel.put_batch(synthetic_batch(cfg, tc.seed + i), mesh) for i in range(2)]

    def compile_step():
        return jit_train_step(graphdef, optimizer, cfg, state, mesh).lower(state, batches[0]).compile()

    dev = jax.devices()[0]
    say(f"bench: {jax.device_count()} x {dev.device_kind} ({jax.default_backend()}), mesh "
        f"{dict(mesh.shape)}, batch {tc.batch_size} x {cfg.data.seq_len}, dtype {tc.dtype}")
    with parallel.use_mesh(mesh):
        t0 = time.perf_counter()
        compiled = compile_step()
        compile_s = time.perf_counter() - t0
        say(f"compiled in {compile_s:.1f} s")
        state, times, cpu = _time_steps(compiled, state, batches, steps, warmup, say)
        a2a_share = a2a_method = None
        if mesh.shape["expert"] > 1:
            with without_all_to_all():
                variant = compile_step()
            state, times_without, _ = _time_steps(variant, state, batches, steps, warmup, say)
            t_with, t_without = statistics.median(times), statistics.median(times_without)
            a2a_share = (t_with - t_without) / t_with
            a2a_method = ("step time minus the time of the same step compiled with jax.lax.all_to_all "
                          "as an identity (same buffers and FLOPs), over the step time")

    med = statistics.median(times)
    tokens = tc.batch_size * cfg.data.seq_len
    n_dev = jax.device_count()
    tflops = flops_lib.train_flops_per_token(cfg.model, cfg.data.seq_len) * tokens / med / n_dev / 1e12
    peak = flops_lib.peak_tflops(dev, override=tc.peak_tflops)
    mem = compiled_memory_bytes(compiled)
    device_peak = device_peak_memory()
    if device_peak is not None:
        peak_mem, mem_source = device_peak, "device memory_stats peak_bytes_in_use"
    elif mem is not None:
        peak_mem, mem_source = mem["total"], "XLA compiled memory analysis (argument + output + temp - alias)"
    else:
        peak_mem, mem_source = None, None
    return {
        "tokens_per_sec": tokens / med, "step_time_s": med, "step_time_min_s": min(times),
        "step_time_max_s": max(times), "step_time_spread": (max(times) - min(times)) / med,
        "step_cpu_time_s": statistics.median(cpu),
        "tflops_per_device": tflops, "mfu": tflops / peak if peak else None, "peak_tflops": peak,
        "peak_memory_bytes": peak_mem, "peak_memory_source": mem_source, "compiled_memory": mem,
        "all_to_all_share": a2a_share, "all_to_all_method": a2a_method,
        "backend": jax.default_backend(), "device_kind": dev.device_kind, "num_devices": n_dev,
        "mesh": dict(mesh.shape), "batch_size": tc.batch_size, "seq_len": cfg.data.seq_len,
        "dtype": tc.dtype, "steps": steps, "warmup": warmup, "compile_s": compile_s,
        "active_matmul_params": flops_lib.matmul_params_per_token(cfg.model),
        "jax": jax.__version__, "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
    }


def summary(r: dict[str, Any]) -> str:
    mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}% of {r['peak_tflops']:.3g} TFLOP/s"
    mem = "unknown" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**30:.2f} GiB"
    lines = [f"step time {r['step_time_s'] * 1e3:.1f} ms median (min {r['step_time_min_s'] * 1e3:.1f}, "
             f"max {r['step_time_max_s'] * 1e3:.1f}) | {r['tokens_per_sec']:,.0f} tokens/s | "
             f"{r['tflops_per_device']:.4g} TFLOP/s per device | MFU {mfu} | peak memory {mem}"
             + (f" ({r['peak_memory_source']})" if r["peak_memory_source"] else "")]
    if r["all_to_all_share"] is not None:
        lines.append(f"all-to-all share of the step: {100 * r['all_to_all_share']:.1f}% "
                     f"({r['all_to_all_method']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moejax.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config file (default: the built-in defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (after compile and warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--json", action="store_true", help="last stdout line: the result as one JSON object")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        raise UserError(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    cfg = config_lib.load(args.config, args.set)
    parallel.maybe_initialize_distributed()
    say = (lambda m: print(m, flush=True)) if jax.process_index() == 0 else (lambda m: None)
    result = run(cfg, args.steps, args.warmup, say)
    say(summary(result))
    if args.json and jax.process_index() == 0:
        print(json.dumps(result), flush=True)
    return 0


def _reexec_with_huge_pages() -> None:
    """Run this command again with glibc's malloc asking for transparent huge pages (where the
    environment does not set GLIBC_TUNABLES already, or MOEJAX_BENCH_NO_HUGETLB=1 opts out).

    XLA:CPU allocates a step's temporary buffers afresh on every execution; buffers over glibc's
    mmap threshold (at most 32 MiB) come straight from the kernel, and touching their 4 KiB pages
    for the first time costs a page fault each. With `glibc.malloc.hugetlb=1` malloc asks for 2 MiB
    pages (`madvise`), 512 times fewer faults: 1-8% less step time at the peer comparison's shapes
    (docs/benchmarks.md). It changes no result, only the time."""
    import sys

    if os.environ.get("GLIBC_TUNABLES") is not None or os.environ.get("MOEJAX_BENCH_NO_HUGETLB") == "1":
        return
    if not sys.platform.startswith("linux"):
        return
    env = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.hugetlb=1")
    os.execve(sys.executable, [sys.executable, "-m", "moejax.bench", *sys.argv[1:]], env)


if __name__ == "__main__":
    _reexec_with_huge_pages()
    run_cli(main)

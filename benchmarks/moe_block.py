"""Time the MoE block forward+backward for each dispatch path (and grouped-matmul implementation).

    python benchmarks/moe_block.py [--tokens 2048] [--experts 8] [--top-k 2] [--d-model 256]
                                   [--d-expert 512] [--repeats 10] [--json]

Prints one row per variant: median and min wall time of a jitted value_and_grad of the block
(parameters and input), device-synchronised, after a compile + warm-up call, and checks that a
second call with a different routing did not recompile.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import config
from moejax.model.moe import MoEBlock


def time_variant(args, dispatch: str, gmm: str) -> dict:
    cfg = config.load(None, [
        f"model.d_model={args.d_model}", f"model.moe.num_experts={args.experts}",
        f"model.moe.top_k={args.top_k}", f"model.moe.d_expert={args.d_expert}",
        f"model.moe.dispatch={dispatch}", f"model.moe.gmm={gmm}",
        f"model.moe.tile_size={args.tile}", "model.moe.capacity_factor=1.25",
        f"model.n_heads={max(1, args.d_model // 64)}", f"model.n_kv_heads={max(1, args.d_model // 64)}",
    ])
    block = MoEBlock(cfg.model, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(block)

    def loss(params, x):
        out = nnx.merge(graphdef, params)(x)
        return jnp.sum(out.y * out.y) + out.stats.z_sum

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    keys = jax.random.split(jax.random.key(1), args.repeats + 2)
    xs = [jax.random.normal(k, (1, args.tokens, args.d_model), jnp.float32) for k in keys]
    t0 = time.perf_counter()
    jax.block_until_ready(step(params, xs[0]))
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(step(params, xs[1]))
    times = []
    for x in xs[2:]:
        t0 = time.perf_counter()
        jax.block_until_ready(step(params, x))
        times.append(time.perf_counter() - t0)
    return {"dispatch": dispatch, "gmm": gmm if dispatch == "dropless" else "-",
            "median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
            "compile_s": compile_s, "compiles": step._cache_size()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-expert", type=int, default=512)
    p.add_argument("--tile", type=int, default=config.MoEConfig().tile_size)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--variants", default="dense:auto,capacity:auto,dropless:tiled,dropless:ragged_dot")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    rows = [time_variant(args, *v.split(":")) for v in args.variants.split(",")]
    base = next((r["median_ms"] for r in rows if r["dispatch"] == "dense"), None)
    print(f"backend={jax.default_backend()} tokens={args.tokens} E={args.experts} k={args.top_k} "
          f"d_model={args.d_model} d_expert={args.d_expert} tile={args.tile}")
    print(f"{'dispatch':10} {'gmm':11} {'median ms':>10} {'min ms':>8} {'vs dense':>9} {'compiles':>8}")
    for r in rows:
        speedup = f"{base / r['median_ms']:.2f}x" if base else "-"
        print(f"{r['dispatch']:10} {r['gmm']:11} {r['median_ms']:10.1f} {r['min_ms']:8.1f} "
              f"{speedup:>9} {r['compiles']:8d}")
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()

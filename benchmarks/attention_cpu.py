"""The attention core's forward + backward on CPU: `xla` (dense) against `chunked` at several block
sizes, over sequence lengths at a fixed number of tokens (where `auto` switches on CPU, and with which
blocks: moejax.model.attention_impl.CPU_CHUNKED_FROM and cpu_block).

    python benchmarks/attention_cpu.py [--tokens 2048] [--heads 8] [--kv-heads 4] [--head-dim 32]
                                       [--seqs 128,256,512,1024] [--blocks 64x64,128x64,128x128,256x128]

Each cell: median ms of `--repeats` calls of a jitted value_and_grad of sum(out^2) w.r.t. q, k and v
(float32, causal, one packed segment per row), after a compile and a warm-up call. The default
shapes are the peer comparison's attention (benchmarks/peer_compare.py): 8 query heads over 4 KV
heads of width 32, 2,048 tokens per step.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from moejax.model import attention_impl as ai
from moejax.model.attention_chunked import chunked_attention


def median_ms(f, *args, repeats: int) -> float:
    jax.block_until_ready(f(*args))
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def fwd_bwd(attn):
    return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(attn(q, k, v) ** 2), argnums=(0, 1, 2)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--seqs", default="128,256,512,1024")
    p.add_argument("--blocks", default="64x64,128x64,128x128,256x128")
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    blocks = [tuple(int(x) for x in b.split("x")) for b in args.blocks.split(",")]
    scale = args.head_dim ** -0.5
    print("seq   xla ms  " + "  ".join(f"chunked {bq}x{bk} ms" for bq, bk in blocks) + "  auto picks")
    for t in (int(s) for s in args.seqs.split(",")):
        b = max(1, args.tokens // t)
        rng = np.random.default_rng(0)
        q = jnp.asarray(rng.standard_normal((b, t, args.heads, args.head_dim)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((b, t, args.kv_heads, args.head_dim)), jnp.float32)
        v = jnp.asarray(rng.standard_normal((b, t, args.kv_heads, args.head_dim)), jnp.float32)
        seg = jnp.ones((b, t), jnp.int32)
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        mask = ai.dense_mask(seg, pos, None)
        row = [median_ms(fwd_bwd(lambda q, k, v: ai.grouped_attention(q, k, v, mask, scale)), q, k, v,
                         repeats=args.repeats)]
        for bq, bk in blocks:
            row.append(median_ms(fwd_bwd(lambda q, k, v, bq=bq, bk=bk: chunked_attention(
                q, k, v, seg, pos, scale, None, bq, bk)), q, k, v, repeats=args.repeats))
        spec = ai.AttnSpec("auto", scale, None, 512, 512)
        name = ai.pick_auto("cpu", jnp.float32, t, spec, args.head_dim, args.head_dim)
        picked = ai.auto_spec("cpu", name, t, spec)
        pick = name if name != "chunked" else f"chunked {picked.block_q}x{picked.block_kv}"
        print(f"{t:<5} " + "  ".join(f"{ms:8.1f}" for ms in row) + f"  {pick}", flush=True)


if __name__ == "__main__":
    main()

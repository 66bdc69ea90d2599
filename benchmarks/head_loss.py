"""The LM head + cross-entropy alone, forward + backward: unfused (the [B, T, V] logits, then
`losses.lm_loss_sum`) against fused (`losses.head_loss_sum`, the head inside the loss's chunks).

    python benchmarks/head_loss.py [--batch 8] [--seq 256] [--d-model 256] [--vocab 4096] [--repeats 20]

Median ms of `--repeats` calls of a jitted value_and_grad w.r.t. the hidden states and the head,
after a compile and a warm-up call (float32; defaults: the peer comparison's shapes), and the
largest difference of the value and gradients between the two.
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from moejax.losses import chunk_positions, head_loss_sum

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention_cpu import median_ms  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=20)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((a.batch, a.seq, a.d_model)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((a.d_model, a.vocab)) * 0.02, jnp.float32)
    tg = jnp.asarray(rng.integers(0, a.vocab, (a.batch, a.seq)), jnp.int32)
    m = jnp.ones((a.batch, a.seq), jnp.float32)
    fns = {name: jax.jit(jax.value_and_grad(lambda x, w, f=fused: head_loss_sum(x, w, tg, m, fused=f),
                                            argnums=(0, 1)))
           for name, fused in (("unfused", False), ("fused", True))}
    outs = {name: f(x, w) for name, f in fns.items()}
    diff = max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(outs["unfused"]),
                                                               jax.tree.leaves(outs["fused"])))
    print(f"chunk: {chunk_positions(a.seq, a.batch, a.vocab)} positions x {a.batch} rows")
    for name, f in fns.items():
        print(f"{name:8s} {median_ms(f, x, w, repeats=a.repeats):7.1f} ms")
    print(f"max |unfused - fused| over value and gradients: {diff:.1e}")


if __name__ == "__main__":
    main()

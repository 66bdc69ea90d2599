"""Whole train steps of config variants, compiled in one process and timed interleaved (one step of
each per round), so that a change of machine load hits every variant alike.

    python benchmarks/step_variants.py [--rounds 16] VARIANTS_JSON

VARIANTS_JSON: a list of [name, fused_head, overrides], e.g.
  '[["xla, unfused", false, ["model.attention_impl=xla"]], ["auto, fused", true, []]]'
`fused_head` false forces the unfused LM head + loss (`losses.head_loss_sum(fused=False)`), true
leaves the choice to `losses.fused_head_applies`. Overrides go on the peer comparison's shapes
(benchmarks/peer_compare.py: vocab 4096, d_model 256, 4 layers, 8/4 heads, 8 experts top-2 of width
512, batch 8 x 256, float32, AdamW). Prints, per variant, the median and minimum wall time of the
rounds after the first two, the median process CPU time (all threads; steadier on a shared
machine) and tokens/s from the median.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax

from moejax import bench, config, losses, parallel, train
from moejax.optim import make_optimizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peer_compare import SHAPES  # noqa: E402


def base_sets() -> list[str]:
    s = SHAPES
    return [f"model.vocab_size={s['vocab']}", f"model.d_model={s['d_model']}", f"model.n_layers={s['layers']}",
            f"model.n_heads={s['heads']}", f"model.n_kv_heads={s['kv_heads']}",
            f"model.moe.num_experts={s['experts']}", f"model.moe.top_k={s['top_k']}",
            f"model.moe.d_expert={s['d_expert']}", f"data.seq_len={s['seq']}",
            f"train.batch_size={s['batch']}", "train.dtype=float32", "mesh.data=1"]


def compile_variant(fused: bool, overrides: list[str]):
    cfg = config.load(None, base_sets() + overrides)
    mesh = parallel.make_mesh(cfg, jax.devices()[:1])
    opt = make_optimizer(cfg.train)
    graphdef, state = train.create_sharded_state(cfg, mesh, opt)
    batch = parallel.put_batch(bench.synthetic_batch(cfg, 0), mesh)
    if not fused:
        train.fused_head_applies = lambda head, vocab_split: False
    try:
        with parallel.use_mesh(mesh):
            step = train.jit_train_step(graphdef, opt, cfg, state, mesh).lower(state, batch).compile()
    finally:
        train.fused_head_applies = losses.fused_head_applies
    return step, state, batch, cfg.train.batch_size * cfg.data.seq_len


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("variants")
    p.add_argument("--rounds", type=int, default=16)
    args = p.parse_args()
    variants = {name: compile_variant(fused, sets) for name, fused, sets in json.loads(args.variants)}
    wall = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, (step, state, batch, tokens) in variants.items():
            t0, c0 = time.perf_counter(), time.process_time()
            new_state, _ = step(state, batch)
            jax.block_until_ready(new_state)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            variants[name] = (step, new_state, batch, tokens)
    for name, (_, _, _, tokens) in variants.items():
        w, c = wall[name][2:], cpu[name][2:]
        print(f"{name:24s} wall median {1e3 * statistics.median(w):7.1f} ms  min {1e3 * min(w):7.1f}  "
              f"cpu median {1e3 * statistics.median(c):7.1f} ms  tokens/s {tokens / statistics.median(w):,.0f}")


if __name__ == "__main__":
    main()

"""Each speed change of the train step against the code it replaced, timed in one process.

    python benchmarks/speed_changes.py [--set key=value ...] [--rounds 8]

The replaced code is kept here, verbatim, as the "before" variants; each variant is the real train
step (`moejax.train.make_train_step`, jitted with the state donated, as `moejax.bench` runs it) with
the functions swapped in before tracing. The variants run interleaved, one step each per round, so
a change of machine load hits them all alike (`--only` picks some: variants sharing a process
were seen to slow the last one down, so compare two also in separate processes). Printed per variant: median wall time and median
process CPU time (all threads; steadier on a shared machine) per step, and tokens/s.

Variants (cumulative):
  before            log_softmax cross-entropy; tiled expert FFN saving each tile's weight slices
  +tile_checkpoint  the tiled FFN keeps only its matmul outputs for the backward pass
  +chunked_ce       cross-entropy with a hand-written backward, in chunks of positions
  +attention_layout attention as batched matmuls over (batch, KV head), the mask as a bias (current code)
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from moejax import bench, config, parallel, train
from moejax.model import attention_impl, dispatch
from moejax.optim import make_optimizer


def lm_loss_sum_before(logits_btv, targets_bt, mask_bt):
    logp = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets_bt[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * mask_bt)


def grouped_ffn_tiled_before(x_nd, experts, group_sizes_e, tile):
    n, d = x_nd.shape
    dest, tile_expert, num_tiles = dispatch.tile_layout(group_sizes_e, n, tile)
    x_pad = jnp.zeros((num_tiles * tile, d), x_nd.dtype).at[dest].set(x_nd, mode="drop", unique_indices=True)

    def one_tile(args):
        x_cd, e = args
        return dispatch.swiglu(x_cd, experts.w_gate[e], experts.w_up[e], experts.w_down[e])

    y = jax.lax.map(one_tile, (x_pad.reshape(num_tiles, tile, d), tile_expert))
    return y.reshape(num_tiles * tile, -1).at[dest].get(mode="fill", fill_value=0, unique_indices=True)


def grouped_attention_before(q_btnh, k_bskh, v_bskv, mask, scale):
    b, t, n, hd = q_btnh.shape
    kv = k_bskh.shape[2]
    q = q_btnh.reshape(b, t, kv, n // kv, hd)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k_bskh, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bskv.dtype)
    out = jnp.einsum("bkgts,bskv->btkgv", probs, v_bskv)
    return out.reshape(b, t, n, v_bskv.shape[-1])


# name -> (cross-entropy, tiled expert FFN, attention core)
VARIANTS = {
    "before": (lm_loss_sum_before, grouped_ffn_tiled_before, grouped_attention_before),
    "+tile_checkpoint": (lm_loss_sum_before, dispatch.grouped_ffn_tiled, grouped_attention_before),
    "+chunked_ce": (train.lm_loss_sum, dispatch.grouped_ffn_tiled, grouped_attention_before),
    "+attention_layout": (train.lm_loss_sum, dispatch.grouped_ffn_tiled, attention_impl.grouped_attention),
}


def compile_variant(cfg, name, mesh, opt, graphdef, state, batch):
    loss, tiled, attn = VARIANTS[name]
    saved = (train.lm_loss_sum, dispatch.grouped_ffn_tiled, dispatch.GROUPED_FFNS._items["tiled"],
             attention_impl.grouped_attention)
    train.lm_loss_sum, dispatch.grouped_ffn_tiled, attention_impl.grouped_attention = loss, tiled, attn
    dispatch.GROUPED_FFNS._items["tiled"] = tiled
    try:
        with parallel.use_mesh(mesh):
            return train.jit_train_step(graphdef, opt, cfg, state, mesh).lower(state, batch).compile()
    finally:
        (train.lm_loss_sum, dispatch.grouped_ffn_tiled, dispatch.GROUPED_FFNS._items["tiled"],
         attention_impl.grouped_attention) = saved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--only", default=None, metavar="NAME[,NAME]",
                   help="run only these variants (one per process compares them without sharing a process)")
    a = p.parse_args()
    names = a.only.split(",") if a.only else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    cfg = config.load(None, ["mesh.data=1"] + a.set)
    mesh = parallel.make_mesh(cfg, jax.devices()[:1])
    opt = make_optimizer(cfg.train)
    batch = parallel.put_batch(bench.synthetic_batch(cfg, 0), mesh)
    runs = {}
    for name in names:
        graphdef, state = train.create_sharded_state(cfg, mesh, opt)
        runs[name] = [compile_variant(cfg, name, mesh, opt, graphdef, state, batch), state]
    wall = {k: [] for k in runs}
    cpu = {k: [] for k in runs}
    for r in range(a.rounds + 2):
        for name, run in runs.items():
            c0, t0 = time.process_time(), time.perf_counter()
            run[1], metrics = run[0](run[1], batch)
            jax.block_until_ready((run[1], metrics))
            if r >= 2:  # two warm-up rounds
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    tokens = cfg.train.batch_size * cfg.data.seq_len
    for name in runs:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        print(f"{name:<18} wall {1e3 * w:8.1f} ms (min {1e3 * min(wall[name]):7.1f})  cpu {1e3 * c:8.1f} ms  "
              f"{tokens / w:7,.0f} tokens/s", flush=True)


if __name__ == "__main__":
    main()

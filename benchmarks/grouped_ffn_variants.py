"""Alternatives to the tiled grouped expert FFN that were tried and not kept, timed against it.

    python benchmarks/grouped_ffn_variants.py [--rows 4096] [--repeats 10] [--fill 1.0] [--rounds 1]

Forward + backward (`value_and_grad` w.r.t. the rows and the expert weights) of the grouped SwiGLU
over `--rows` expert-sorted rows (E = 8, d_model 256, width 512, float32, random routing: the
dropless MoE layer of the peer comparison), median and min of `--repeats` calls after a compile call.
`--fill f` routes only f * rows of them (the rest is the padding of a fixed-size buffer, as the
expert-parallel receive buffer). `--rounds` repeats the whole table, variants interleaved per round.
Variants, each at tile 256 and 128:
  tiled        moejax.model.gmm.grouped_ffn_tiled (in use: a loop over only the used tiles, custom VJP)
  tiled_static moejax.model.gmm.grouped_ffn_tiled_static (lax.map over the worst-case tile count)
  tiled_fused  tiled_static with the gate and up projections as one [D, 2F] matmul
  loop_fused   a fori_loop over only the tiles the routing uses (a traced trip count), fused
               gate/up, and a hand-written backward accumulating the weight gradients in place
"max err" is against the first variant at tile 256.
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from moejax.model import gmm
from moejax.model.gmm import ExpertWeights, tile_layout


def tiled_fused(x_nd, experts, group_sizes_e, tile):
    n, d = x_nd.shape
    f = experts.w_gate.shape[-1]
    dest, tile_expert, num_tiles = tile_layout(group_sizes_e, n, tile)
    x_pad = jnp.zeros((num_tiles * tile, d), x_nd.dtype).at[dest].set(x_nd, mode="drop", unique_indices=True)
    wgu = jnp.concatenate([experts.w_gate, experts.w_up], axis=-1)
    def one_tile(args):
        x_cd, e = args
        h = x_cd @ wgu[e]
        return (jax.nn.silu(h[:, :f]) * h[:, f:]) @ experts.w_down[e]
    one_tile = jax.checkpoint(one_tile, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    y = jax.lax.map(one_tile, (x_pad.reshape(num_tiles, tile, d), tile_expert))
    return y.reshape(num_tiles * tile, -1).at[dest].get(mode="fill", fill_value=0, unique_indices=True)

def loop_fused(x_nd, experts, group_sizes_e, tile):
    n, d = x_nd.shape
    f = experts.w_gate.shape[-1]
    dest, tile_expert, num_tiles = tile_layout(group_sizes_e, n, tile)
    used = jnp.sum((group_sizes_e.astype(jnp.int32) + tile - 1) // tile)
    @jax.custom_vjp
    def core(x_pad, wgu, wd):
        return fwd(x_pad, wgu, wd)[0]
    def fwd(x_pad, wgu, wd):
        def body(i, y):
            e = tile_expert[i]
            xc = jax.lax.dynamic_slice_in_dim(x_pad, i * tile, tile)
            h = xc @ wgu[e]
            yc = (jax.nn.silu(h[:, :f]) * h[:, f:]) @ wd[e]
            return jax.lax.dynamic_update_slice_in_dim(y, yc, i * tile, 0)
        y = jax.lax.fori_loop(0, used, body, jnp.zeros((num_tiles * tile, wd.shape[-1]), x_pad.dtype))
        return y, (x_pad, wgu, wd)
    def bwd(res, dy):
        x_pad, wgu, wd = res
        def body(i, acc):
            dx, dwgu, dwd = acc
            e = tile_expert[i]
            xc = jax.lax.dynamic_slice_in_dim(x_pad, i * tile, tile)
            dyc = jax.lax.dynamic_slice_in_dim(dy, i * tile, tile)
            h = xc @ wgu[e]; g, u = h[:, :f], h[:, f:]
            sg = jax.nn.sigmoid(g); act = g * sg
            da = dyc @ wd[e].T
            dh = jnp.concatenate([da * u * (sg * (1 + g * (1 - sg))), da * act], axis=-1)
            dwd = dwd.at[e].add((act * u).T @ dyc)
            dwgu = dwgu.at[e].add(xc.T @ dh)
            dx = jax.lax.dynamic_update_slice_in_dim(dx, dh @ wgu[e].T, i * tile, 0)
            return dx, dwgu, dwd
        return jax.lax.fori_loop(0, used, body, (jnp.zeros_like(x_pad), jnp.zeros_like(wgu), jnp.zeros_like(wd)))
    core.defvjp(fwd, bwd)
    x_pad = jnp.zeros((num_tiles * tile, d), x_nd.dtype).at[dest].set(x_nd, mode="drop", unique_indices=True)
    wgu = jnp.concatenate([experts.w_gate, experts.w_up], axis=-1)
    y = core(x_pad, wgu, experts.w_down)
    return y.at[dest].get(mode="fill", fill_value=0, unique_indices=True)


VARIANTS = {"tiled": gmm.grouped_ffn_tiled, "tiled_static": gmm.grouped_ffn_tiled_static,
            "tiled_fused": tiled_fused, "loop_fused": loop_fused}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--fill", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--only", nargs="*", default=None, help="variant names to run (default: all)")
    a = p.parse_args()
    rng = np.random.default_rng(0)
    e, d, f = 8, 256, 512
    w = ExpertWeights(*(jnp.asarray(rng.normal(size=s) * 0.05, jnp.float32) for s in [(e, d, f), (e, d, f), (e, f, d)]))
    x = jnp.asarray(rng.normal(size=(a.rows, d)), jnp.float32)
    gs = jnp.asarray(np.bincount(rng.integers(0, e, int(a.rows * a.fill)), minlength=e), jnp.int32)
    ref = None
    print(f"{'variant':<12} {'tile':>4} {'median ms':>10} {'min ms':>8}  max err   ({int(gs.sum())} of {a.rows} rows routed)")
    steps = {}
    for name, fn in VARIANTS.items():
        for tile in (256, 128):
            if a.only and name not in a.only:
                continue
            steps[name, tile] = jax.jit(jax.value_and_grad(
                lambda x, w, fn=fn, tile=tile: jnp.sum(jnp.sin(fn(x, w, gs, tile))), argnums=(0, 1)))
    for _ in range(a.rounds):
        for (name, tile), step in steps.items():
            r = jax.block_until_ready(step(x, w))
            times = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(step(x, w))
                times.append(time.perf_counter() - t0)
            ref = r if ref is None else ref
            err = max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(r), jax.tree.leaves(ref)))
            print(f"{name:<12} {tile:>4} {1e3 * np.median(times):>10.1f} {1e3 * min(times):>8.1f}  {err:.1e}", flush=True)


if __name__ == "__main__":
    main()

"""The tiled grouped FFN with tail tiles (each group padded to a quarter tile) against the whole-tile
form it replaced (each group padded to a whole tile), in the real train step, timed interleaved.

    python benchmarks/tail_tiles.py [--rounds 24] [--tiles 256,128]

The replaced code is kept here verbatim (`whole_tiles`, registered for this process only as
`model.moe.gmm: tiled_whole`); both run as `benchmarks/step_variants.py` runs its variants (the peer
comparison's shapes, one step of each per round; the median and minimum of the rounds after the
first two). At 8 experts of ~512 routed rows each, whole tiles of 256 rows compute ~1.25x the
routed rows, tail tiles ~1.06x.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp

from moejax import names
from moejax.model import gmm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_variants  # noqa: E402


def _whole_fwd(x_pad, w_gate, w_up, w_down, tile_expert, n_used, tile: int):
    rows = x_pad.shape[0]
    f, d_out = w_gate.shape[-1], w_down.shape[-1]

    def body(i, carry):
        y, g_pad, u_pad = carry
        e = tile_expert[i]
        xc = jax.lax.dynamic_slice_in_dim(x_pad, i * tile, tile)
        g, u = xc @ w_gate[e], xc @ w_up[e]
        yc = (jax.nn.silu(g) * u) @ w_down[e]
        return (jax.lax.dynamic_update_slice_in_dim(y, yc, i * tile, 0),
                jax.lax.dynamic_update_slice_in_dim(g_pad, g, i * tile, 0),
                jax.lax.dynamic_update_slice_in_dim(u_pad, u, i * tile, 0))

    init = (jnp.zeros((rows, d_out), x_pad.dtype), jnp.zeros((rows, f), x_pad.dtype),
            jnp.zeros((rows, f), x_pad.dtype))
    return jax.lax.fori_loop(0, n_used, body, init)


@jax.custom_vjp
def whole_tile_loop(x_pad, w_gate, w_up, w_down, tile_expert, n_used, tile_rows):
    return _whole_fwd(x_pad, w_gate, w_up, w_down, tile_expert, n_used, tile_rows.shape[0])[0]


def _whole_vjp_fwd(x_pad, w_gate, w_up, w_down, tile_expert, n_used, tile_rows):
    y, g_pad, u_pad = _whole_fwd(x_pad, w_gate, w_up, w_down, tile_expert, n_used, tile_rows.shape[0])
    return y, (x_pad, g_pad, u_pad, w_gate, w_up, w_down, tile_expert, n_used, tile_rows)


def _whole_vjp_bwd(res, dy):
    x_pad, g_pad, u_pad, w_gate, w_up, w_down, tile_expert, n_used, tile_rows = res
    tile = tile_rows.shape[0]

    def body(i, acc):
        dx, dwg, dwu, dwd = acc
        e = tile_expert[i]
        sl = lambda a: jax.lax.dynamic_slice_in_dim(a, i * tile, tile)  # noqa: E731
        xc, g, u, dyc = sl(x_pad), sl(g_pad), sl(u_pad), sl(dy)
        sg = jax.nn.sigmoid(g)
        act = g * sg
        da = dyc @ w_down[e].T
        du = da * act
        dg = da * u * (sg * (1 + g * (1 - sg)))
        dwd = dwd.at[e].add((act * u).T @ dyc)
        dwg = dwg.at[e].add(xc.T @ dg)
        dwu = dwu.at[e].add(xc.T @ du)
        dx = jax.lax.dynamic_update_slice_in_dim(dx, dg @ w_gate[e].T + du @ w_up[e].T, i * tile, 0)
        return dx, dwg, dwu, dwd

    init = (jnp.zeros_like(x_pad), jnp.zeros_like(w_gate), jnp.zeros_like(w_up), jnp.zeros_like(w_down))
    dx, dwg, dwu, dwd = jax.lax.fori_loop(0, n_used, body, init)
    return dx, dwg, dwu, dwd, None, None, None


whole_tile_loop.defvjp(_whole_vjp_fwd, _whole_vjp_bwd)


def whole_tiles(x_nd, experts, group_sizes_g, tile=256, *, tiling=None, group_offset=None):
    """The replaced `tiled`: every group padded to whole tiles (`gmm.tile_layout`)."""
    def impl(x, gs):
        n, d = x.shape
        dest, tile_expert, num_tiles = gmm.tile_layout(gs, n, tile)
        x_pad = jnp.zeros((num_tiles * tile, d), x.dtype).at[dest].set(x, mode="drop", unique_indices=True)
        y = whole_tile_loop(x_pad, experts.w_gate, experts.w_up, experts.w_down, tile_expert,
                            gmm.used_tiles(gs, tile), jnp.zeros((tile,), jnp.int8))
        return y.at[dest].get(mode="fill", fill_value=0, unique_indices=True)

    return gmm.with_group_offset(impl, x_nd, experts, group_sizes_g, group_offset)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=24)
    p.add_argument("--tiles", default="256", help="comma-separated model.moe.tile_size values")
    a = p.parse_args()
    gmm.GROUPED_FFNS.register("tiled_whole")(gmm.GroupedFfn(whole_tiles, frozenset({"cpu"}), "replaced"))
    names.GROUPED_FFNS = names.GROUPED_FFNS + ("tiled_whole",)
    variants = []
    for t in a.tiles.split(","):
        variants += [[f"whole tiles, tile {t}", True, ["model.moe.gmm=tiled_whole", f"model.moe.tile_size={t}"]],
                     [f"tail tiles, tile {t}", True, [f"model.moe.tile_size={t}"]]]
    sys.argv = [sys.argv[0], "--rounds", str(a.rounds), json.dumps(variants)]
    step_variants.main()


if __name__ == "__main__":
    main()

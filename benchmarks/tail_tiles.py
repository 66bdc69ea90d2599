"""The tiled grouped FFN with tail tiles (each group padded to a quarter tile) against the whole-tile
form it replaced (each group padded to a whole tile), in the real train step, timed interleaved.

    python benchmarks/tail_tiles.py [--rounds 24] [--tiles 256,128]

The replaced layout is rebuilt here (`whole_tiles`: `gmm.tile_layout` and one loop over whole
tiles, registered for this process only as `model.moe.gmm: tiled_whole`); both run as `benchmarks/step_variants.py` runs its variants (the peer
comparison's shapes, one step of each per round; the median and minimum of the rounds after the
first two). At 8 experts of ~512 routed rows each, whole tiles of 256 rows compute ~1.25x the
routed rows, tail tiles ~1.06x.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax.numpy as jnp

from moejax import names
from moejax.model import gmm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_variants  # noqa: E402


def whole_tiles(x_nd, experts, group_sizes_g, tile=256, *, tiling=None, group_offset=None):
    """The replaced `tiled`: every group padded to whole tiles (`gmm.tile_layout`), one loop over the
    whole tiles in use (`gmm.tile_loop` with one tile size: the loop the replaced code ran)."""
    def impl(x, gs):
        n, d = x.shape
        dest, tile_expert, num_tiles = gmm.tile_layout(gs, n, tile)
        x_pad = jnp.zeros((num_tiles * tile, d), x.dtype).at[dest].set(x, mode="drop", unique_indices=True)
        tiles = ((jnp.arange(num_tiles, dtype=jnp.int32) * tile, tile_expert, gmm.used_tiles(gs, tile)),)
        y = gmm.tile_loop(x_pad, experts.w_gate, experts.w_up, experts.w_down, tiles,
                          (jnp.zeros((tile,), jnp.int8),))
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

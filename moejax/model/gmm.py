"""Grouped expert FFN: rows sorted by expert, each group through its own expert's SwiGLU.

Every implementation is registered in `GROUPED_FFNS` (chosen by `model.moe.gmm`) as a `GroupedFfn`
with one signature,

    ffn(x_nd, experts, group_sizes_g, tile, *, tiling=None, group_offset=None) -> y_nd

and computes, for sorted rows x[N, D] and group sizes g (sum(g) <= N; rows past sum(g) are the
padding of a fixed-size buffer and get output 0):

    y[rows of group i] = SwiGLU_{i - group_offset}(x[rows of group i])  for the E_local groups
    group_offset <= i < group_offset + E_local, where E_local = experts.w_gate.shape[0];

rows of other groups get 0 (`group_offset` serves expert-sharded weights: a device holds experts
[offset, offset + E_local) and `group_sizes` counts all of them). `tile` is the tiled form's rows
per tile; `tiling` is megablox's (tm, tk, tn). Each entry declares the backends it runs on
(`GroupedFfn.backends`), so a self-check can run every entry the backend supports against the
others and the dense reference.

The work of every implementation follows the actual group sizes, not the buffer's worst case
(issue 16: a dropless expert-parallel receive buffer is sized for the worst case, W times the
average): megablox and the tiled form visit only the tiles the groups occupy (a traced trip count),
and ragged_dot gets the group sizes, which leave the rows past their sum out.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from moejax.registry import Registry


class ExpertWeights(NamedTuple):
    w_gate: jax.Array  # [E, D, F]  (under expert parallelism: this device's E / ep experts)
    w_up: jax.Array    # [E, D, F]
    w_down: jax.Array  # [E, F, D]


@dataclasses.dataclass(frozen=True)
class GroupedFfn:
    """A registered grouped FFN: the function and where it runs.

    `backends`: the `jax.default_backend()` names it runs on ("cpu" for a Pallas kernel means its
    interpret mode: exact but slow, for tests)."""
    fn: Callable[..., jax.Array]
    backends: frozenset[str]
    description: str

    def __post_init__(self):
        object.__setattr__(self, "__doc__", self.fn.__doc__)  # help() and the config reference

    def __call__(self, x_nd, experts, group_sizes_g, tile: int = 256, *, tiling=None, group_offset=None):
        return self.fn(x_nd, experts, group_sizes_g, tile, tiling=tiling, group_offset=group_offset)

    def supports(self, backend: str) -> bool:
        return backend in self.backends


GROUPED_FFNS: Registry[GroupedFfn] = Registry("grouped expert FFN")
ALL_BACKENDS = frozenset({"cpu", "gpu", "tpu"})


def register(name: str, backends=ALL_BACKENDS):
    def add(fn):
        GROUPED_FFNS.register(name)(GroupedFfn(fn, frozenset(backends), (fn.__doc__ or "").split("\n")[0]))
        return fn
    return add


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    return (jax.nn.silu(x @ w_gate) * (x @ w_up)) @ w_down


def local_groups(group_sizes_g: jax.Array, group_offset, e_local: int) -> tuple[jax.Array, jax.Array]:
    """(first row of group `group_offset`, the sizes of groups [offset, offset + e_local))."""
    gs = group_sizes_g.astype(jnp.int32)
    if group_offset is None:
        return jnp.zeros((), jnp.int32), gs[:e_local]
    off = jnp.asarray(group_offset, jnp.int32)
    start = jnp.sum(jnp.where(jnp.arange(gs.shape[0]) < off, gs, 0))
    return start, jax.lax.dynamic_slice_in_dim(gs, off, e_local)


def with_group_offset(impl: Callable[[jax.Array, jax.Array], jax.Array], x_nd, experts: ExpertWeights,
                      group_sizes_g, group_offset) -> jax.Array:
    """Run `impl(x_rows, local_sizes)` (which handles groups 0..E_local-1 starting at row 0) on the
    groups [offset, offset + E_local): rotate their rows to the front and back again."""
    e_local = experts.w_gate.shape[0]
    if group_offset is None and group_sizes_g.shape[0] == e_local:
        return impl(x_nd, group_sizes_g.astype(jnp.int32))
    start, local = local_groups(group_sizes_g, group_offset, e_local)
    n = x_nd.shape[0]
    idx = (jnp.arange(n, dtype=jnp.int32) + start) % n
    y = impl(x_nd[idx], local)  # rows past sum(local) come out 0
    return jnp.zeros_like(y).at[idx].set(y, unique_indices=True)


# ---------------------------------------------------------------------------------------------
# ragged_dot


@register("ragged_dot")
def grouped_ffn_ragged_dot(x_nd, experts: ExpertWeights, group_sizes_g, tile=256, *, tiling=None,
                           group_offset=None) -> jax.Array:
    """Two `jax.lax.ragged_dot` grouped matmuls (gate and up fused into one); fast on GPU/TPU."""
    del tile, tiling
    f = experts.w_gate.shape[-1]
    w_gu = jnp.concatenate([experts.w_gate, experts.w_up], axis=-1)

    def impl(x, gs):
        h = jax.lax.ragged_dot(x, w_gu, gs)
        return jax.lax.ragged_dot(jax.nn.silu(h[:, :f]) * h[:, f:], experts.w_down, gs)

    return with_group_offset(impl, x_nd, experts, group_sizes_g, group_offset)


# ---------------------------------------------------------------------------------------------
# Tiled (CPU): a tile map from the actual group sizes, a loop over only the used tiles.


def tile_layout(group_sizes_e: jax.Array, num_rows: int, tile: int) -> tuple[jax.Array, jax.Array, int]:
    """Place each group at the start of a fresh tile of `tile` rows (megablox's tile map).

    Returns (dest[N]: padded row of each sorted row, tile_expert[num_tiles], num_tiles). The buffer's
    tile count is static, the worst case: sum_e ceil(g_e / tile) <= ceil(N / tile) + E - 1; the group
    sizes stay traced values, so one compilation serves every routing. `used_tiles` gives how many
    of them the groups actually occupy.
    """
    e = group_sizes_e.shape[0]
    num_tiles = -(-num_rows // tile) + e - 1
    gs = group_sizes_e.astype(jnp.int32)
    tiles_per_group = (gs + tile - 1) // tile
    tile_end = jnp.cumsum(tiles_per_group)
    group_end = jnp.cumsum(gs)
    rows = jnp.arange(num_rows, dtype=jnp.int32)
    group = jnp.minimum(jnp.searchsorted(group_end, rows, side="right"), e - 1)
    dest = (tile_end - tiles_per_group)[group] * tile + rows - (group_end - gs)[group]
    # Rows past the last group (padding of a fixed-size buffer) point past the end, each to its own
    # index so the scatter keeps unique indices (XLA then writes rows in parallel): dropped.
    dest = jnp.where(rows < group_end[-1], dest, num_tiles * tile + rows)
    tile_expert = jnp.minimum(jnp.searchsorted(tile_end, jnp.arange(num_tiles), side="right"), e - 1)
    return dest, tile_expert, num_tiles


def used_tiles(group_sizes_e: jax.Array, tile: int) -> jax.Array:
    """int32[]: tiles the groups occupy, sum_e ceil(g_e / tile) (`tile_layout`'s tiles in use)."""
    return jnp.sum((group_sizes_e.astype(jnp.int32) + tile - 1) // tile)


def tail_tile(tile: int) -> int:
    """Rows of the tiled form's tail tiles: a quarter tile (each group's rows past its whole tiles
    are padded to this, not to a whole tile: 1/8 tile of padding per group on average, not 1/2)."""
    return max(1, tile // 4)


class TileMap(NamedTuple):
    """Where the tiled form's tiles lie in its padded buffer (traced values, static sizes).

    Each group is laid out as its whole tiles of `tile` rows, then its remaining rows in tail tiles
    of `tail_tile(tile)` rows; groups follow one another. Tile i of a kind starts at row `start[i]`
    and belongs to expert `expert[i]`; the first `count` entries are in use."""
    dest: jax.Array          # int32[N]: buffer row of each sorted row (past the end: dropped)
    rows: int                # the buffer's static row count
    big_start: jax.Array     # int32[max whole tiles]
    big_expert: jax.Array
    big_count: jax.Array     # int32[]
    tail_start: jax.Array    # int32[max tail tiles]
    tail_expert: jax.Array
    tail_count: jax.Array


def tile_map(group_sizes_e: jax.Array, num_rows: int, tile: int) -> TileMap:
    """The two-size tile map of `num_rows` sorted rows in groups `group_sizes_e` (sum <= num_rows).

    The static sizes are the worst cases (whole tiles: floor(N / tile); tail tiles: a group's tail
    is under `tile` rows, so at most ceil(N / tail) + E - 1 and E * tile / tail of them; buffer rows:
    N + E * (tail - 1), rounded up to a tail); the loops run only the tiles in use."""
    e = group_sizes_e.shape[0]
    tail = tail_tile(tile)
    gs = group_sizes_e.astype(jnp.int32)
    big_e = gs // tile
    tail_e = (gs - big_e * tile + tail - 1) // tail
    padded_e = big_e * tile + tail_e * tail
    start_e = jnp.cumsum(padded_e) - padded_e
    group_end = jnp.cumsum(gs)
    rows_i = jnp.arange(num_rows, dtype=jnp.int32)
    group = jnp.minimum(jnp.searchsorted(group_end, rows_i, side="right"), e - 1)
    rows = -(-(num_rows + e * (tail - 1)) // tail) * tail
    dest = start_e[group] + rows_i - (group_end - gs)[group]
    # Rows past the last group (padding of a fixed-size buffer) point past the end, each to its own
    # index so the scatter keeps unique indices (XLA then writes rows in parallel): dropped.
    dest = jnp.where(rows_i < group_end[-1], dest, rows + rows_i)

    def kind(count_e, first_e, size, max_tiles):
        end = jnp.cumsum(count_e)
        i = jnp.arange(max_tiles, dtype=jnp.int32)
        owner = jnp.minimum(jnp.searchsorted(end, i, side="right"), e - 1)
        start = first_e[owner] + (i - (end - count_e)[owner]) * size
        return jnp.minimum(start, rows - size), owner, end[-1]

    big = kind(big_e, start_e, tile, num_rows // tile)  # none when N < tile
    tails = kind(tail_e, start_e + big_e * tile, tail, min(-(-num_rows // tail) + e - 1, e * (-(-tile // tail))))
    return TileMap(dest, rows, *big, *tails)


def _swiglu_tiles(x_pad, w_gate, w_up, w_down, start, expert, count, size: int, carry):
    """Write y, and the gate and up pre-activations (saved for the backward pass, so it recomputes
    no matmul), of the first `count` tiles of `size` rows at rows `start` into `carry` (y, g, u)."""

    def body(i, carry):
        y, g_pad, u_pad = carry
        e, r = expert[i], start[i]
        xc = jax.lax.dynamic_slice_in_dim(x_pad, r, size)
        g, u = xc @ w_gate[e], xc @ w_up[e]
        yc = (jax.nn.silu(g) * u) @ w_down[e]
        return (jax.lax.dynamic_update_slice_in_dim(y, yc, r, 0),
                jax.lax.dynamic_update_slice_in_dim(g_pad, g, r, 0),
                jax.lax.dynamic_update_slice_in_dim(u_pad, u, r, 0))

    return jax.lax.fori_loop(0, count, body, carry)


def _tile_loop_fwd(x_pad, w_gate, w_up, w_down, tiles, sizes):
    rows = x_pad.shape[0]
    f, d_out = w_gate.shape[-1], w_down.shape[-1]
    carry = (jnp.zeros((rows, d_out), x_pad.dtype), jnp.zeros((rows, f), x_pad.dtype),
             jnp.zeros((rows, f), x_pad.dtype))
    for (start, expert, count), size in zip(tiles, sizes):
        carry = _swiglu_tiles(x_pad, w_gate, w_up, w_down, start, expert, count, size, carry)
    return carry


@jax.custom_vjp
def tile_loop(x_pad, w_gate, w_up, w_down, tiles, size_rows):
    """The tiled SwiGLU over the tiles of `x_pad` in use: `tiles` is one (start int32[M], expert
    int32[M], count int32[]) per tile size, `size_rows` one [size] dummy per tile size (its length
    is the size, so it stays static). Rows of no tile in use are never computed: zeros."""
    sizes = tuple(r.shape[0] for r in size_rows)
    return _tile_loop_fwd(x_pad, w_gate, w_up, w_down, tiles, sizes)[0]


def _tile_loop_vjp_fwd(x_pad, w_gate, w_up, w_down, tiles, size_rows):
    sizes = tuple(r.shape[0] for r in size_rows)
    y, g_pad, u_pad = _tile_loop_fwd(x_pad, w_gate, w_up, w_down, tiles, sizes)
    return y, (x_pad, g_pad, u_pad, w_gate, w_up, w_down, tiles, size_rows)


def _tile_loop_vjp_bwd(res, dy):
    x_pad, g_pad, u_pad, w_gate, w_up, w_down, tiles, size_rows = res

    def tiles_of(size, start, expert, count, acc):
        def body(i, acc):
            dx, dwg, dwu, dwd = acc
            e, r = expert[i], start[i]
            sl = lambda a: jax.lax.dynamic_slice_in_dim(a, r, size)  # noqa: E731
            xc, g, u, dyc = sl(x_pad), sl(g_pad), sl(u_pad), sl(dy)
            sg = jax.nn.sigmoid(g)
            act = g * sg
            da = dyc @ w_down[e].T
            du = da * act
            dg = da * u * (sg * (1 + g * (1 - sg)))
            dwd = dwd.at[e].add((act * u).T @ dyc)
            dwg = dwg.at[e].add(xc.T @ dg)
            dwu = dwu.at[e].add(xc.T @ du)
            dx = jax.lax.dynamic_update_slice_in_dim(dx, dg @ w_gate[e].T + du @ w_up[e].T, r, 0)
            return dx, dwg, dwu, dwd

        return jax.lax.fori_loop(0, count, body, acc)

    acc = (jnp.zeros_like(x_pad), jnp.zeros_like(w_gate), jnp.zeros_like(w_up), jnp.zeros_like(w_down))
    for (start, expert, count), rows in zip(tiles, size_rows):
        acc = tiles_of(rows.shape[0], start, expert, count, acc)
    dx, dwg, dwu, dwd = acc
    zero_tiles = jax.tree.map(lambda _: None, tiles)
    return dx, dwg, dwu, dwd, zero_tiles, jax.tree.map(lambda _: None, size_rows)


tile_loop.defvjp(_tile_loop_vjp_fwd, _tile_loop_vjp_bwd)


@register("tiled")
def grouped_ffn_tiled(x_nd, experts: ExpertWeights, group_sizes_g, tile=256, *, tiling=None,
                      group_offset=None) -> jax.Array:
    """Each group as whole tiles plus quarter-size tail tiles; loops over the tiles in use run each
    tile's expert's SwiGLU.

    The tile map (`tile_map`: which expert owns each tile, where it starts) comes from the actual
    group sizes and the loops' trip counts are the actual numbers of tiles (traced), so a
    worst-case buffer costs only its real rows, and a group is padded to a multiple of a quarter
    tile, not of a tile (docs/benchmarks.md: the padding was 1.25x the routed rows at 8 experts).
    On XLA:CPU this beats `ragged_dot` (a dense masked dot there, E times the FLOPs).
    """
    del tiling

    def impl(x, gs):
        n, d = x.shape
        tm = tile_map(gs, n, tile)
        x_pad = jnp.zeros((tm.rows, d), x.dtype).at[tm.dest].set(x, mode="drop", unique_indices=True)
        tiles = ((tm.big_start, tm.big_expert, tm.big_count), (tm.tail_start, tm.tail_expert, tm.tail_count))
        sizes = (jnp.zeros((tile,), jnp.int8), jnp.zeros((tail_tile(tile),), jnp.int8))
        if not tm.big_start.shape[0]:  # fewer rows than one tile: only tail tiles
            tiles, sizes = tiles[1:], sizes[1:]
        y = tile_loop(x_pad, experts.w_gate, experts.w_up, experts.w_down, tiles, sizes)
        return y.at[tm.dest].get(mode="fill", fill_value=0, unique_indices=True)

    return with_group_offset(impl, x_nd, experts, group_sizes_g, group_offset)


@register("tiled_static")
def grouped_ffn_tiled_static(x_nd, experts: ExpertWeights, group_sizes_g, tile=256, *, tiling=None,
                             group_offset=None) -> jax.Array:
    """The tiled form over the static worst-case tile count (`lax.map`, autodiff backward)."""
    del tiling

    def impl(x, gs):
        n, d = x.shape
        dest, tile_expert, num_tiles = tile_layout(gs, n, tile)
        x_pad = jnp.zeros((num_tiles * tile, d), x.dtype).at[dest].set(x, mode="drop", unique_indices=True)

        # Keep only the tile's matmul outputs for the backward pass: without the policy, autodiff
        # of the loop also saves each tile's slices of the expert weights (docs/benchmarks.md).
        def one_tile(args):
            x_cd, e = args
            return swiglu(x_cd, experts.w_gate[e], experts.w_up[e], experts.w_down[e])

        one_tile = jax.checkpoint(one_tile, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
        y = jax.lax.map(one_tile, (x_pad.reshape(num_tiles, tile, d), tile_expert))
        return y.reshape(num_tiles * tile, -1).at[dest].get(mode="fill", fill_value=0, unique_indices=True)

    return with_group_offset(impl, x_nd, experts, group_sizes_g, group_offset)


# ---------------------------------------------------------------------------------------------
# megablox (TPU Pallas; interpret mode elsewhere)

DEFAULT_TILING = (128, 128, 128)


def megablox_tiling(m: int, k: int, n: int, tiling) -> tuple[int, int, int]:
    """megablox's (tm, tk, tn), each clipped to its dimension (tm then divides the padded rows)."""
    tm, tk, tn = tiling or DEFAULT_TILING
    return min(tm, m), min(tk, k), min(tn, n)


@register("megablox", backends=("tpu", "cpu"))
def grouped_ffn_megablox(x_nd, experts: ExpertWeights, group_sizes_g, tile=256, *, tiling=None,
                         group_offset=None) -> jax.Array:
    """Pallas megablox gmm (custom VJP: gmm + tgmm), as MaxText on TPU; interpret mode off TPU.

    megablox visits only the tiles the groups occupy. It leaves rows outside the computed groups
    uninitialised (NaN in interpret mode), so they are masked with `where` (a product with 0 keeps
    the NaN), on the input too so that no NaN reaches the gradient of the rows."""
    del tile
    from jax.experimental.pallas.ops.tpu.megablox import gmm as megablox_gmm

    interpret = jax.default_backend() != "tpu"
    n_rows, d = x_nd.shape
    f = experts.w_gate.shape[-1]
    e_local = experts.w_gate.shape[0]
    gs = group_sizes_g.astype(jnp.int32)
    offset = None if group_offset is None else jnp.asarray(group_offset, jnp.int32)
    start, local = local_groups(gs, offset, e_local)
    tm = megablox_tiling(n_rows, d, 2 * f, tiling)[0]
    m = -(-n_rows // tm) * tm  # megablox needs m % tm == 0: pad with rows of no group
    rows = jnp.arange(m, dtype=jnp.int32)[:, None]
    valid = (rows >= start) & (rows < start + jnp.sum(local))
    x = jnp.pad(x_nd, ((0, m - n_rows), (0, 0)))
    x = jnp.where(valid, x, 0)
    w_gu = jnp.concatenate([experts.w_gate, experts.w_up], axis=-1)

    def mm(a, w):
        return megablox_gmm(a, w, gs, preferred_element_type=a.dtype,
                            tiling=megablox_tiling(m, a.shape[1], w.shape[2], tiling),
                            group_offset=offset, interpret=interpret)

    h = jnp.where(valid, mm(x, w_gu), 0)
    y = jnp.where(valid, mm(jax.nn.silu(h[:, :f]) * h[:, f:], experts.w_down), 0)
    return y[:n_rows]


# ---------------------------------------------------------------------------------------------
# auto


def auto_choice(backend: str) -> str:
    """What `auto` runs on `backend`: megablox on TPU, ragged_dot on GPU, tiled on CPU."""
    return {"tpu": "megablox", "gpu": "ragged_dot"}.get(backend, "tiled")


@register("auto")
def grouped_ffn_auto(x_nd, experts: ExpertWeights, group_sizes_g, tile=256, *, tiling=None,
                     group_offset=None) -> jax.Array:
    """megablox on TPU, ragged_dot on GPU, tiled on CPU (chosen at trace time)."""
    return GROUPED_FFNS.get(auto_choice(jax.default_backend()))(
        x_nd, experts, group_sizes_g, tile, tiling=tiling, group_offset=group_offset)

"""Expert-parallel collectives (inside `shard_map`): the flat and 2D hierarchical all-to-all, the
ragged all-to-all (an exact all_gather emulation on CPU), and DeepSpeed-TED's duplicate-token dropping.

Every function here moves data only; the expert math stays in `moejax.model.dispatch`.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp


class ExpertAxis(NamedTuple):
    """Inside `shard_map`: the mesh axis the experts are split over, and its size. Device i of the
    axis owns experts [i * E_local, (i + 1) * E_local).

    local_size: devices per node along the axis for the 2D hierarchical all-to-all (0 = flat).
    ted_axis / ted_size: the tensor axis when duplicate tokens are dropped (DeepSpeed-TED).
    exchange / buffer_factor: the dropless exchange (padded | ragged) and its receive buffer."""
    name: str
    size: int
    local_size: int = 0
    ted_axis: str | None = None
    ted_size: int = 1
    exchange: str = "padded"
    buffer_factor: float | None = None


# ---------------------------------------------------------------------------------------------
# Fixed-shape all-to-all: flat, or Tutel's 2D hierarchical form.


def all_to_all(x: jax.Array, ep: ExpertAxis) -> jax.Array:
    """x[W, ...]: chunk j goes to device j of the expert axis; returns [W, ...], chunk j received
    from device j. With `ep.local_size = G` (W = N x G, device n * G + g is local rank g of node n),
    Tutel's 2D hierarchical all-to-all (Hwang et al. 2023, sec. 3.3): first inside each node, each
    device hands its local peer g' everything bound for local rank g' of any node; then across nodes
    among the devices of the same local rank. Inter-node messages per device fall from W - G to
    N - 1, each G times larger; the result is bitwise the flat one (the same values moved)."""
    g = ep.local_size
    if not g or g == ep.size:
        return jax.lax.all_to_all(x, ep.name, 0, 0)
    w, rest = x.shape[0], x.shape[1:]
    n = w // g
    intra = [[node * g + r for r in range(g)] for node in range(n)]
    inter = [[node * g + r for node in range(n)] for r in range(g)]
    # [N dest node, G dest local] -> [G dest local, N dest node]: chunk g' goes to local peer g'.
    y = x.reshape(n, g, *rest).swapaxes(0, 1)
    y = jax.lax.all_to_all(y, ep.name, 0, 0, axis_index_groups=intra)  # [G src local, N dest node]
    y = jax.lax.all_to_all(y.swapaxes(0, 1), ep.name, 0, 0, axis_index_groups=inter)
    return y.reshape(w, *rest)  # [N src node, G src local] = source device order


# ---------------------------------------------------------------------------------------------
# Padded exchange: fixed-shape slots sized to the step's real load.


def size_buckets(smallest: int, largest: int, growth: float = 2.0) -> tuple[int, ...]:
    """The static sizes a data-dependent buffer is rounded up to: `smallest` grown by `growth`
    (rounded up) while below `largest`, then `largest`. One `lax.switch` over them compiles each
    size once; the last is the worst case, so nothing is ever dropped."""
    out, c = [], max(1, smallest)
    while c < largest:
        out.append(c)
        c = max(c + 1, math.ceil(c * growth))
    return tuple(out) + (largest,)


# Growth of the exchange buffers' bucket sizes: sqrt(2) wastes at most ~41% of a buffer, in
# 2 * log2(W) + 1 compiled sizes (7 for W = 8).
SLOT_GROWTH = math.sqrt(2.0)


def padded_slot_buckets(n: int, w: int) -> tuple[int, ...]:
    """Slot sizes of the padded exchange: from the average rows per destination ceil(n / W) up to
    n (every row bound for one device)."""
    return size_buckets(math.ceil(n / w), n, SLOT_GROWTH)


def padded_exchange(x_nd: jax.Array, expert_n: jax.Array, e_local: int, ep: ExpertAxis,
                    compute: Callable[[jax.Array, jax.Array], jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Rows to their experts' owners and `compute(rows, local_expert)`'s results back
    (local_expert = e_local marks a padding row), by one fixed-shape all-to-all each way with a
    slot of C rows per destination. C is the largest number of rows any device of the exchange
    sends to any one device this step, rounded up to a `padded_slot_buckets` size (a
    `lax.switch`, every size compiled once). C >= every device's need, so nothing is dropped:
    dropless at a cost that follows the real load, not the worst case W * N. Rows whose expert is
    E_total (TED padding) are sent nowhere; their output is 0. Returns (y_nd, 0 dropped)."""
    n, d = x_nd.shape
    w = ep.size
    live = expert_n < w * e_local
    owner = jnp.where(live, expert_n // e_local, 0)
    local = jnp.where(live, expert_n % e_local, e_local)
    # Position of each row among the rows for the same owner, in row order.
    onehot = jax.nn.one_hot(owner, w, dtype=jnp.int32) * live[:, None]
    cum = jnp.cumsum(onehot, axis=0)
    pos = jnp.take_along_axis(cum, owner[:, None], axis=1)[:, 0] - 1
    need = jnp.max(cum[-1]) if n else jnp.zeros((), jnp.int32)
    # Every device whose collectives meet inside the switch must take the same branch.
    need = jax.lax.pmax(need, (ep.name, ep.ted_axis) if ep.ted_axis else ep.name)

    def at(c: int, x_nd):
        slot = jnp.where(live, pos, c)  # c: out of range, not written
        send = jnp.zeros((w, c, d), x_nd.dtype).at[owner, slot].set(x_nd, mode="drop", unique_indices=True)
        send_e = jnp.full((w, c), e_local, jnp.int32).at[owner, slot].set(local, mode="drop")
        recv = all_to_all(send, ep)
        recv_e = all_to_all(send_e, ep)
        out = compute(recv.reshape(w * c, d), recv_e.reshape(-1))
        back = all_to_all(out.reshape(w, c, d), ep)
        return jnp.where(live[:, None], back[owner, jnp.minimum(slot, c - 1)], 0)

    y = bucketed(at, padded_slot_buckets(n, w), need, x_nd)
    return y, jnp.zeros((), jnp.int32)


def bucketed(fn: Callable, buckets: Sequence[int], need: jax.Array, *args):
    """`fn(size, *args)` at the smallest of the static `buckets` >= `need` (the last if none is),
    as one `lax.switch`. Each branch is rematerialised (`jax.checkpoint`): differentiating a switch
    otherwise makes every branch return the residuals of all of them, zero-filled for the branches
    not taken, which cost more than the whole exchange (measured in benchmarks/expert_parallel.py)."""
    if len(buckets) == 1:
        return fn(buckets[0], *args)
    idx = jnp.minimum(jnp.searchsorted(jnp.asarray(buckets, jnp.int32), need, side="left"), len(buckets) - 1)
    return jax.lax.switch(idx, [jax.checkpoint(functools.partial(fn, c)) for c in buckets], *args)


# ---------------------------------------------------------------------------------------------
# Ragged all-to-all.


def ragged_all_to_all_emulated(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                               *, axis_name: str):
    """`jax.lax.ragged_all_to_all` from all_gathers, with exactly its semantics: slot i of the K
    slots (K / W per destination) sends operand[input_offsets[i] : + send_sizes[i]] to device
    i // (K / W), written there at output_offsets[i]; the receiver writes recv_sizes[i] rows of its
    slot i; rows nobody writes keep `output`'s value; a later slot overwrites an earlier one.
    It moves W times the bytes (every operand goes everywhere): a stand-in for XLA:CPU only."""
    del send_sizes  # the receiver's recv_sizes say how much it writes (they must agree)
    w = jax.lax.psum(1, axis_name)
    k = input_offsets.shape[0]
    s = k // w
    me = jax.lax.axis_index(axis_name)
    ops = jax.lax.all_gather(operand, axis_name)              # [W, N, ...]
    in_off = jax.lax.all_gather(input_offsets, axis_name)     # [W, K]
    out_off = jax.lax.all_gather(output_offsets, axis_name)   # [W, K]
    slot = jnp.arange(k)
    src, their = slot // s, me * s + slot % s                 # sender of my slot i, its slot index
    start_in, start_out = in_off[src, their], out_off[src, their]
    rows = jnp.arange(output.shape[0])[:, None]
    hit = (rows >= start_out) & (rows < start_out + recv_sizes)          # [M, K]
    last = k - 1 - jnp.argmax(hit[:, ::-1], axis=1)                      # the last slot writing a row
    row_in = jnp.clip(start_in[last] + rows[:, 0] - start_out[last], 0, operand.shape[0] - 1)
    vals = ops[src[last], row_in]
    written = hit.any(axis=1).reshape((-1,) + (1,) * (output.ndim - 1))
    return jnp.where(written, vals.astype(output.dtype), output)


def ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                      axis_name: str):
    """`jax.lax.ragged_all_to_all` on TPU/GPU; on CPU, whose XLA cannot compile it, the exact
    emulation above (chosen per platform at lowering time, so CI traces the same program)."""
    def real(*a):
        return jax.lax.ragged_all_to_all(*a, axis_name=axis_name)

    def emulated(*a):
        return ragged_all_to_all_emulated(*a, axis_name=axis_name)

    return jax.lax.platform_dependent(operand, output, input_offsets, send_sizes, output_offsets,
                                      recv_sizes, cpu=emulated, default=real)


def _exclusive_cumsum(x, axis):
    return jnp.cumsum(x, axis=axis) - x


def ragged_buffer_rows(num_rows: int, ep: ExpertAxis) -> int:
    """Receive-buffer rows: the worst case (every device sends all its rows to one device) unless
    `buffer_factor` caps it at that multiple of the average (num_rows per device)."""
    worst = ep.size * num_rows
    if ep.buffer_factor is None:
        return worst
    return max(1, min(worst, math.ceil(ep.buffer_factor * num_rows)))


def ragged_exchange(x_nd: jax.Array, expert_n: jax.Array, e_local: int, ep: ExpertAxis,
                    compute: Callable[[jax.Array, jax.Array], jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Rows to their experts' owners with `ragged_all_to_all`, `compute(rows, local_expert)` there
    (local_expert = e_local marks an unused buffer row), results back the reverse way.

    Counts go first (an all_gather of each device's per-expert counts, [W, E] integers): from them
    every device knows every offset. Rows travel sorted by expert, so each device's block arrives
    grouped by local expert. Rows that do not fit a capped receive buffer are dropped (their output
    is 0) and counted. Returns (y_nd in the input row order, dropped rows sent by this device)."""
    n, d = x_nd.shape
    w = ep.size
    me = jax.lax.axis_index(ep.name)
    order = jnp.argsort(expert_n, stable=True)
    counts = jnp.bincount(expert_n, length=w * e_local).astype(jnp.int32)
    sizes = jax.lax.all_gather(counts, ep.name).reshape(w, w, e_local)   # [src, dst, local expert]
    pair = sizes.sum(-1)                                                 # [src, dst] rows
    dst_off = _exclusive_cumsum(pair, 0)          # where src's block starts in dst's buffer
    src_off = _exclusive_cumsum(pair, 1)          # where src's rows for dst start in src's sorted rows
    # The receive buffer: the largest receiver's rows this step, rounded up to a bucket (a
    # `lax.switch`), within the configured cap. The counts are the same on every device of the
    # exchange; under TED the tensor ranks, whose collectives meet in `compute`, must agree too.
    need = jnp.max(pair.sum(0))
    if ep.ted_axis:
        need = jax.lax.pmax(need, ep.ted_axis)
    x_sorted = x_nd[order]

    def at(m: int, x_sorted):
        kept_pair = jnp.clip(m - dst_off, 0, pair)    # what fits the receiver's buffer
        kept = jnp.clip(kept_pair[..., None] - _exclusive_cumsum(sizes, 2), 0, sizes)
        recv = ragged_all_to_all(x_sorted, jnp.zeros((m, d), x_nd.dtype), src_off[me], kept_pair[me],
                                 dst_off[me], kept_pair[:, me], axis_name=ep.name)
        # Local expert of each received row: blocks by source, inside each by local expert.
        ends = (dst_off[:, me][:, None] + jnp.cumsum(kept[:, me, :], -1)).reshape(-1)
        rows = jnp.arange(m)
        group = jnp.searchsorted(ends, rows, side="right")
        local = jnp.where(rows < jnp.sum(kept_pair[:, me]), group % e_local, e_local).astype(jnp.int32)
        out = compute(recv, local)
        back = ragged_all_to_all(out, jnp.zeros((n, d), out.dtype), dst_off[:, me], kept_pair[:, me],
                                 src_off[:, me], kept_pair[me], axis_name=ep.name)
        return back, (jnp.sum(pair[me]) - jnp.sum(kept_pair[me])).astype(jnp.int32)

    back, dropped = bucketed(at, ragged_buffer_buckets(n, ep), need, x_sorted)
    y = jnp.zeros_like(back).at[order].set(back, unique_indices=True)
    return y, dropped


def ragged_buffer_buckets(num_rows: int, ep: ExpertAxis) -> tuple[int, ...]:
    """Receive-buffer sizes of the ragged exchange: from the average (num_rows: each device
    receives as many rows as it sends, on average) grown by sqrt(2) up to `ragged_buffer_rows`
    (the worst case, or the `buffer_factor` cap)."""
    cap = ragged_buffer_rows(num_rows, ep)
    return size_buckets(min(num_rows, cap), cap, SLOT_GROWTH)


# ---------------------------------------------------------------------------------------------
# DeepSpeed-TED: drop the tensor-parallel duplicates before the expert all-to-all.


def ted_split(x: jax.Array, ep: ExpertAxis, axis: int) -> jax.Array:
    """This tensor rank's 1/t of `x` along `axis` (zero-padded to a multiple of t)."""
    t = ep.ted_size
    pad = -x.shape[axis] % t
    if pad:
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, pad)
        x = jnp.pad(x, widths)
    size = x.shape[axis] // t
    return jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(ep.ted_axis) * size, size, axis)


def ted_gather(x: jax.Array, ep: ExpertAxis, axis: int, length: int) -> jax.Array:
    """Inverse of `ted_split`: the t ranks' parts all-gathered along `axis`, padding cut."""
    x = jax.lax.all_gather(x, ep.ted_axis, axis=axis, tiled=True)
    return jax.lax.slice_in_dim(x, 0, length, axis=axis)


def owner_compute(fn: Callable[..., jax.Array], ep: ExpertAxis, axis: int, *args: jax.Array) -> jax.Array:
    """Run the (tensor-sliced) expert math `fn` on the rows an owner received. Under TED each
    tensor rank received different rows, but holds only its slice of every expert's hidden units:
    gather the rows over `tensor`, compute the partial outputs, and reduce-scatter them back, so
    each rank ends with the complete outputs of its own rows."""
    if ep.ted_axis is None:
        return fn(*args)
    full = [jax.lax.all_gather(a, ep.ted_axis, axis=axis, tiled=True) for a in args]
    return jax.lax.psum_scatter(fn(*full), ep.ted_axis, scatter_dimension=axis, tiled=True)

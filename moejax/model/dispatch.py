"""Dispatch: send routed token copies to their experts, run the expert SwiGLUs, combine the outputs.

A dispatcher is a function registered in `DISPATCHERS`:

    dispatch(x_td, experts: ExpertWeights, routing: Routing, cfg: MoEConfig) -> (y_td, dropped)

computing  y_t = sum over assignments (t, e, w) kept by the dispatcher of  w * SwiGLU_e(x_t),
with `dropped` the number of assignments it could not keep (only `capacity` drops). All three compute
the same function when nothing is dropped; `dense` is the reference the others are tested against.

The dropless path runs the experts over rows sorted by expert through a grouped expert FFN
(`GROUPED_FFNS`, chosen by `model.moe.gmm`): `jax.lax.ragged_dot` where it is fast (TPU, GPU), and a
loop over fixed-size tiles on CPU, where XLA's ragged_dot runs far below the machine's matmul rate.
"""
from __future__ import annotations

import logging
import math
from typing import Callable

import jax
import jax.numpy as jnp

from moejax.config import MoEConfig
import moejax.model.exchange as exchange
from moejax.model.exchange import ExpertAxis
# The grouped FFNs live in moejax.model.gmm; their names stay importable from here.
from moejax.model.gmm import (GROUPED_FFNS, ExpertWeights, GroupedFfn, grouped_ffn_auto,  # noqa: F401
                              grouped_ffn_megablox, grouped_ffn_ragged_dot, grouped_ffn_tiled,
                              grouped_ffn_tiled_static, swiglu, tile_layout, used_tiles)
from moejax.model.routing import Routing
from moejax.registry import Registry




DispatchFn = Callable[..., tuple[jax.Array, jax.Array]]
DISPATCHERS: Registry[DispatchFn] = Registry("dispatch")

# ---------------------------------------------------------------------------------------------
# Dispatchers.


@DISPATCHERS.register("dense")
def dense_dispatch(x_td, experts: ExpertWeights, r: Routing, cfg: MoEConfig, ep: ExpertAxis | None = None):
    """Every expert computes every token; the (sparse) gates select. E/k times the FLOPs: a reference.
    Expert-parallel: the tokens of the expert group are all-gathered, each device applies its own
    experts, and the partial outputs are reduce-scattered back to the tokens' devices."""
    t = x_td.shape[0]
    e_local = experts.w_gate.shape[0]
    e = e_local * (ep.size if ep else 1)
    gates_te = jnp.zeros((t, e), jnp.float32).at[r.token, r.expert].add(r.weight)
    if ep:
        x_td = jax.lax.all_gather(x_td, ep.name, tiled=True)
        gates_te = jax.lax.all_gather(gates_te, ep.name, tiled=True)
        gates_te = jax.lax.dynamic_slice_in_dim(gates_te, jax.lax.axis_index(ep.name) * e_local, e_local, 1)
    h = jax.nn.silu(jnp.einsum("td,edf->tef", x_td, experts.w_gate))
    h = h * jnp.einsum("td,edf->tef", x_td, experts.w_up)
    h = h * gates_te.astype(h.dtype)[:, :, None]
    y = jnp.einsum("tef,efd->td", h, experts.w_down)
    if ep:
        y = jax.lax.psum_scatter(y, ep.name, tiled=True)
    return y, jnp.zeros((), jnp.int32)


def capacity(num_assignments: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert: ceil(tokens * k / E * capacity_factor) (GShard, Lepikhin et al. 2020)."""
    return max(1, math.ceil(num_assignments / num_experts * capacity_factor))


def to_owners(buf_ecd: jax.Array, ep: ExpertAxis) -> jax.Array:
    """[E, C, D] buffers for every expert -> [E_local, ep * C, D]: every device's buffers for the
    experts this device owns (one all-to-all over the expert axis)."""
    e, c, d = buf_ecd.shape
    x = exchange.all_to_all(buf_ecd.reshape(ep.size, e // ep.size, c, d), ep)
    return x.transpose(1, 0, 2, 3).reshape(e // ep.size, ep.size * c, d)


def from_owners(out_ecd: jax.Array, ep: ExpertAxis) -> jax.Array:
    """The inverse of `to_owners`: [E_local, ep * C, D] -> [E, C, D] back on the tokens' devices."""
    e_local, ec, d = out_ecd.shape
    x = out_ecd.reshape(e_local, ep.size, ec // ep.size, d).transpose(1, 0, 2, 3)
    return exchange.all_to_all(x, ep).reshape(ep.size * e_local, ec // ep.size, d)


def dynamic_capacity_buckets(num_tokens: int, num_assignments: int, num_experts: int) -> tuple[int, ...]:
    """The static capacities `capacity_factor = 0` chooses from: the average load ceil(N / E)
    doubled until one expert could take every token (the most it can receive from one device),
    so a run compiles one switch over these few sizes and never drops (Tutel's dynamic capacity)."""
    return exchange.size_buckets(math.ceil(num_assignments / num_experts), num_tokens)


def _expert_swiglu(buf_ecd: jax.Array, experts: ExpertWeights) -> jax.Array:
    h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", buf_ecd, experts.w_gate))
    h = h * jnp.einsum("ecd,edf->ecf", buf_ecd, experts.w_up)
    return jnp.einsum("ecf,efd->ecd", h, experts.w_down)


def _capacity_dispatch_at(c: int, x_td, experts: ExpertWeights, r: Routing, e: int, pos, live,
                          ep: ExpertAxis | None):
    t, d = x_td.shape
    keep = live & (pos < c)
    slot = jnp.where(keep, r.expert * c + pos, e * c)  # dropped copies all land in one spare row
    buf = jnp.zeros((e * c + 1, d), x_td.dtype).at[slot].set(x_td[r.token])
    buf_ecd = buf[:-1].reshape(e, c, d)
    if ep and ep.ted_axis:
        # DeepSpeed-TED: the t tensor ranks hold identical buffers; each sends 1/t of the slots.
        out = exchange.ted_split(buf_ecd, ep, 1)
        out = to_owners(out, ep)
        out = exchange.owner_compute(lambda b: _expert_swiglu(b, experts), ep, 1, out)
        out = exchange.ted_gather(from_owners(out, ep), ep, 1, c)
    elif ep:
        out = from_owners(_expert_swiglu(to_owners(buf_ecd, ep), experts), ep)
    else:
        out = _expert_swiglu(buf_ecd, experts)
    out = out.reshape(e * c, d)
    w = jnp.where(keep, r.weight, 0.0).astype(x_td.dtype)
    y_nd = out[jnp.minimum(slot, e * c - 1)] * w[:, None]
    y = jnp.zeros((t, d), x_td.dtype).at[r.token].add(y_nd)
    return y, jnp.sum(live & ~keep).astype(jnp.int32)


@DISPATCHERS.register("capacity")
def capacity_dispatch(x_td, experts: ExpertWeights, r: Routing, cfg: MoEConfig,
                      ep: ExpertAxis | None = None):
    """Fixed-capacity buffers [E, C, D] (GShard / Switch). Assignments beyond an expert's C slots,
    in routing priority order, are dropped: the token gets nothing from that expert (the residual
    connection carries it). Same buffers as GShard's one-hot einsum, filled by index instead of by an
    O(T*E*C*D) einsum.

    Expert-parallel (inside shard_map): C is computed from this device's tokens (GShard's per-group
    capacity), and the [E, C, D] buffers travel to the experts' owners and back by all-to-all.
    `capacity_factor = 0`: C is the largest per-expert load in the expert-parallel group this step,
    rounded up to a bucket of `dynamic_capacity_buckets` (a `lax.switch`: one compilation)."""
    t = x_td.shape[0]
    n = r.token.shape[0]
    e = experts.w_gate.shape[0] * (ep.size if ep else 1)
    # Position of each assignment in its expert's buffer, in assignment (= priority) order. An
    # assignment of weight 0 (e.g. GShard's undispatched second choice) takes no slot.
    live = r.weight != 0
    onehot_ne = jax.nn.one_hot(r.expert, e, dtype=jnp.int32) * live[:, None]
    cum = jnp.cumsum(onehot_ne, axis=0)
    pos = jnp.take_along_axis(cum, r.expert[:, None], axis=1)[:, 0] - 1
    if cfg.capacity_factor > 0:
        return _capacity_dispatch_at(capacity(n, e, cfg.capacity_factor), x_td, experts, r, e, pos,
                                     live, ep)
    buckets = dynamic_capacity_buckets(t, n, e)
    logging.getLogger("moejax").info("dynamic capacity: %d compiled buckets %s", len(buckets), buckets)
    load = jnp.max(cum[-1]) if n else jnp.zeros((), jnp.int32)
    if ep:
        load = jax.lax.pmax(load, ep.name)  # every device of the exchange must pick the same size
    return exchange.bucketed(lambda c, x: _capacity_dispatch_at(c, x, experts, r, e, pos, live, ep),
                             buckets, load, x_td)


def grouped_ffn(cfg: MoEConfig) -> Callable[..., jax.Array]:
    """The configured grouped FFN with the config's tiling: f(x_nd, experts, group_sizes, *,
    group_offset=None)."""
    impl = GROUPED_FFNS.get(cfg.gmm)
    return lambda x, w, gs, **kw: impl(x, w, gs, cfg.tile_size, tiling=cfg.gmm_tiling, **kw)


def grouped_by_expert(x_nd: jax.Array, expert_n: jax.Array, experts: ExpertWeights, cfg: MoEConfig
                      ) -> jax.Array:
    """Each row through the SwiGLU of its expert (`expert_n`; the value E marks a padding row,
    whose output is 0): sort by expert, grouped expert FFN, unsort. Used on the rows a device
    receives under expert parallelism."""
    order = jnp.argsort(expert_n, stable=True)
    group_sizes = jnp.bincount(expert_n, length=experts.w_gate.shape[0])
    y_sorted = grouped_ffn(cfg)(x_nd[order], experts, group_sizes)
    return jnp.zeros_like(y_sorted).at[order].set(y_sorted, unique_indices=True)


@DISPATCHERS.register("dropless")
def dropless_dispatch(x_td, experts: ExpertWeights, r: Routing, cfg: MoEConfig,
                      ep: ExpertAxis | None = None):
    """Sort assignments by expert, grouped expert FFN, weighted scatter-add back to tokens
    (MegaBlocks, Gale et al. 2022). Nothing is dropped and nothing is padded to a capacity.

    Expert-parallel: rows go to their experts' owners and back by all-to-all with worst-case
    buffers (see `expert_parallel_ffn`), so the result is still exactly dropless."""
    t, d = x_td.shape
    if ep is None:
        order = jnp.argsort(r.expert, stable=True)
        group_sizes = jnp.bincount(r.expert, length=experts.w_gate.shape[0])
        token, weight = r.token[order], r.weight[order]
        y_nd = grouped_ffn(cfg)(x_td[token], experts, group_sizes)
        dropped = jnp.zeros((), jnp.int32)
    else:
        token, weight = r.token, r.weight
        y_nd, dropped = expert_parallel_ffn(x_td[token], r.expert, experts, cfg, ep)
    y_nd = y_nd * weight.astype(x_td.dtype)[:, None]
    return jnp.zeros((t, d), x_td.dtype).at[token].add(y_nd), dropped


def expert_parallel_ffn(x_nd: jax.Array, expert_n: jax.Array, experts: ExpertWeights, cfg: MoEConfig,
                        ep: ExpertAxis) -> tuple[jax.Array, jax.Array]:
    """Rows to their experts' owner devices, grouped FFN there, results back (inside shard_map).
    Returns (y_nd, rows dropped by this device's exchange).

    `ep.exchange = padded`: one fixed-shape all-to-all whose slot per destination is sized to
    this step's largest device-to-device load (rounded up to a bucket, `exchange.padded_exchange`), so
    nothing is ever dropped and the buffers follow the real load.
    `ragged`: `ragged_all_to_all` of the real rows (`exchange.ragged_exchange`).
    Under DeepSpeed-TED each tensor rank sends 1/t of the (identical) rows and the outputs are
    all-gathered over `tensor` after."""
    n = x_nd.shape[0]
    if ep.ted_axis:
        y, dropped = _exchange_rows(exchange.ted_split(x_nd, ep, 0), exchange.ted_split(expert_n, ep, 0),
                                    experts, cfg, ep, valid=exchange.ted_split(jnp.ones((n,), bool), ep, 0))
        return exchange.ted_gather(y, ep, 0, n), jax.lax.psum(dropped, ep.ted_axis)
    return _exchange_rows(x_nd, expert_n, experts, cfg, ep)


def _exchange_rows(x_nd, expert_n, experts: ExpertWeights, cfg: MoEConfig, ep: ExpertAxis, valid=None):
    e_local = experts.w_gate.shape[0]

    def compute(rows, local_e):
        return exchange.owner_compute(lambda a, b: grouped_by_expert(a, b, experts, cfg), ep, 0, rows, local_e)

    if valid is not None:  # TED padding rows: sent as "no expert" (they take no FFN work)
        expert_n = jnp.where(valid, expert_n, ep.size * e_local)
    if ep.exchange == "ragged":
        return exchange.ragged_exchange(x_nd, expert_n, e_local, ep, compute)
    return exchange.padded_exchange(x_nd, expert_n, e_local, ep, compute)

"""The MoE block: router -> dispatch -> experts -> combine (+ shared experts).

The block holds parameters only; the math is the registered router and dispatcher functions. Its
statistics leave as sums (`RouterStats`), so a sharded caller can reduce them before taking losses.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from moejax import parallel
from moejax.config import MoEConfig, ModelConfig
from moejax.model import dispatch as dispatch_lib
from moejax.model import routing
from moejax.model.layers import SwiGLU, param


class MoEOutput(NamedTuple):
    y: jax.Array                  # [B, T, D]
    stats: routing.RouterStats    # sums over this call's tokens
    dropped: jax.Array            # int32[]: assignments dropped by capacity
    assignments: jax.Array        # int32[]: assignments routed (N)


def routed_experts(x_td, router_w, experts: dispatch_lib.ExpertWeights, valid_t, token_ids_t,
                   cfg: MoEConfig, ep: dispatch_lib.ExpertAxis | None = None, reduce_axes=()):
    """Route and run the experts for one shard of tokens (or all of them): the MoE math.

    Returns (y_td, stats, dropped, assignments); with `reduce_axes` (inside shard_map) the
    statistics are summed over those mesh axes, so the losses are the global ones."""
    # Router in float32 whatever the compute dtype (Switch Transformer, sec. 2.4).
    logits_te = x_td.astype(jnp.float32) @ router_w
    ctx = routing.RouteContext(rng=None, token_ids=token_ids_t)
    r = routing.ROUTERS.get(cfg.router)(logits_te, cfg, ctx)
    y_td, dropped = dispatch_lib.DISPATCHERS.get(cfg.dispatch)(x_td, experts, r, cfg, ep)
    stats = routing.router_stats(r, valid_t)
    n = jnp.asarray(r.token.shape[0], jnp.int32)
    if reduce_axes:
        stats, dropped, n = jax.lax.psum((stats, dropped, n), reduce_axes)
    return y_td, stats, dropped, n


def sharded_routed_experts(mesh, x_td, router_w, experts, valid_t, token_ids_t, cfg: MoEConfig):
    """`routed_experts` inside shard_map over the whole mesh: tokens split over the batch axes,
    experts over `expert` (reached by all-to-all), expert hidden units over `tensor` (partial
    outputs summed), FSDP-split weights gathered on entry."""
    batch = parallel.BATCH_AXES
    ep = dispatch_lib.ExpertAxis("expert", mesh.shape["expert"]) if mesh.shape["expert"] > 1 else None
    w_in, w_out = P("expert", None, "tensor"), P("expert", "tensor", None)

    def local(x, rw, wg, wu, wd, valid, tok):
        y, stats, dropped, n = routed_experts(x, rw, dispatch_lib.ExpertWeights(wg, wu, wd), valid, tok,
                                              cfg, ep, reduce_axes=batch)
        if mesh.shape["tensor"] > 1:
            y = jax.lax.psum(y, "tensor")
        return y, stats, dropped, n

    fn = jax.shard_map(local, mesh=mesh,
                       in_specs=(P(batch, None), P(), w_in, w_in, w_out, P(batch), P(batch)),
                       out_specs=(P(batch, None), P(), P(), P()), check_vma=False)
    return fn(x_td, router_w, *experts, valid_t, token_ids_t)


class MoEBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        m = cfg.moe
        d, e, f, std = cfg.d_model, m.num_experts, m.d_expert, cfg.init_std
        self.cfg = m
        self.router = param(rngs, (d, e), ("embed", None), std)
        self.w_gate = param(rngs, (e, d, f), ("exp", "embed", "mlp"), std)
        self.w_up = param(rngs, (e, d, f), ("exp", "embed", "mlp"), std)
        self.w_down = param(rngs, (e, f, d), ("exp", "mlp", "embed"), std)
        # n shared experts of width F equal one SwiGLU of width n*F (their outputs are summed).
        self.shared = (SwiGLU(d, m.num_shared_experts * (m.d_shared or f), std=std, rngs=rngs)
                       if m.num_shared_experts else None)

    def __call__(self, x_btd: jax.Array, *, valid_bt: jax.Array | None = None,
                 token_ids_bt: jax.Array | None = None, rng: jax.Array | None = None) -> MoEOutput:
        del rng  # no router in the registry draws random numbers yet
        b, t, d = x_btd.shape
        dt = x_btd.dtype
        x_td = x_btd.reshape(b * t, d)
        experts = dispatch_lib.ExpertWeights(self.w_gate[...].astype(dt), self.w_up[...].astype(dt),
                                              self.w_down[...].astype(dt))
        valid_t = jnp.ones((b * t,), bool) if valid_bt is None else valid_bt.reshape(-1)
        tokens_t = jnp.zeros((b * t,), jnp.int32) if token_ids_bt is None else token_ids_bt.reshape(-1)
        mesh = parallel.active_mesh()
        if mesh is None or mesh.size == 1:
            y_td, stats, dropped, n = routed_experts(x_td, self.router[...], experts, valid_t, tokens_t,
                                                     self.cfg)
        else:
            y_td, stats, dropped, n = sharded_routed_experts(mesh, x_td, self.router[...], experts,
                                                             valid_t, tokens_t, self.cfg)
        if self.shared is not None:
            y_td = y_td + self.shared(x_td)
        return MoEOutput(y_td.reshape(b, t, d), stats, dropped, n)

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
import moejax.model.dispatch as dispatch_lib
import moejax.model.routing as routing
from moejax.model.layers import SwiGLU, param


class MoEOutput(NamedTuple):
    y: jax.Array                  # [B, T, D]
    stats: routing.RouterStats    # sums over this call's tokens
    dropped: jax.Array            # int32[]: assignments dropped by capacity
    assignments: jax.Array        # int32[]: assignments routed (N)
    routing: dict | None = None   # with return_routing: probs, gates f32[B, T, E] (for analysis)


class RouterBias(nnx.Variable):
    """A per-expert selection bias that gradients never touch (DeepSeek-V3 aux-loss-free
    balancing); the train step moves it with `routing.bias_update`."""


class RouterInputs(NamedTuple):
    """The router's weights and per-call inputs (None where the router does not use them)."""
    w: jax.Array                        # f32[D, E]
    bias: jax.Array                     # f32[E]
    noise_w: jax.Array | None = None    # f32[D, E]


def routed_experts(x_td, router: RouterInputs, experts: dispatch_lib.ExpertWeights, valid_t, token_ids_t,
                   cfg: MoEConfig, ep: dispatch_lib.ExpertAxis | None = None, reduce_axes=(), *,
                   rng=None, seq_len: int | None = None, return_routing: bool = False):
    """Route and run the experts for one shard of tokens (or all of them): the MoE math.

    Returns (y_td, stats, dropped, assignments, routing_or_None); with `reduce_axes` (inside
    shard_map) the statistics are summed over those mesh axes, so the losses are the global ones."""
    # Router in float32 whatever the compute dtype (Switch Transformer, sec. 2.4).
    x32 = x_td.astype(jnp.float32)
    logits_te = x32 @ router.w
    ctx = routing.RouteContext(rng=rng, token_ids=token_ids_t, bias=router.bias,
                               noise_logits=None if router.noise_w is None else x32 @ router.noise_w)
    r = routing.ROUTERS.get(cfg.router)(logits_te, cfg, ctx)
    if cfg.routed_scaling_factor != 1.0:
        r = r._replace(weight=r.weight * cfg.routed_scaling_factor)
    y_td, dropped = dispatch_lib.DISPATCHERS.get(cfg.dispatch)(x_td, experts, r, cfg, ep)
    stats = routing.router_stats(r, valid_t, seq_len)
    n = jnp.asarray(r.token.shape[0], jnp.int32)
    if reduce_axes:
        stats, dropped, n = jax.lax.psum((stats, dropped, n), reduce_axes)
    info = None
    if return_routing:
        gates = jnp.zeros(r.probs.shape, jnp.float32).at[r.token, r.expert].add(r.weight)
        info = {"probs": r.probs, "gates": gates}
    return y_td, stats, dropped, n, info


def expert_axis(mesh, cfg: MoEConfig) -> dispatch_lib.ExpertAxis | None:
    """The expert-parallel exchange of this mesh and config (None without expert parallelism)."""
    if mesh.shape["expert"] == 1:
        return None
    t = mesh.shape["tensor"]
    ted = cfg.drop_duplicate_tokens and t > 1 and cfg.dispatch != "dense"
    return dispatch_lib.ExpertAxis("expert", mesh.shape["expert"], local_size=cfg.a2a_local_size,
                                   ted_axis="tensor" if ted else None, ted_size=t if ted else 1,
                                   exchange=cfg.ep_exchange, buffer_factor=cfg.ep_buffer_factor)


def sharded_routed_experts(mesh, x_td, router: RouterInputs, experts, valid_t, token_ids_t,
                           cfg: MoEConfig, rng=None, seq_len=None, return_routing=False):
    """`routed_experts` inside shard_map over the whole mesh: tokens split over the batch axes,
    experts over `expert` (reached by all-to-all), expert hidden units over `tensor` (partial
    outputs summed), FSDP-split weights gathered on entry. Random routers draw per token shard."""
    batch = parallel.BATCH_AXES
    ep = expert_axis(mesh, cfg)
    ted = ep is not None and ep.ted_axis is not None
    w_in, w_out = P("expert", None, "tensor"), P("expert", "tensor", None)
    has_rng, has_noise = rng is not None, router.noise_w is not None

    def local(x, rw, rb, nw, wg, wu, wd, valid, tok, key):
        key = jax.random.fold_in(key, jax.lax.axis_index(batch)) if has_rng else None
        y, stats, dropped, n, info = routed_experts(
            x, RouterInputs(rw, rb, nw if has_noise else None), dispatch_lib.ExpertWeights(wg, wu, wd),
            valid, tok, cfg, ep, reduce_axes=batch, rng=key, seq_len=seq_len,
            return_routing=return_routing)
        if mesh.shape["tensor"] > 1 and not ted:  # under TED the exchange already summed them
            y = jax.lax.psum(y, "tensor")
        return y, stats, dropped, n, info

    noise_w = router.noise_w if has_noise else jnp.zeros((), jnp.float32)
    key = rng if has_rng else jnp.zeros((), jnp.float32)
    info_spec = {"probs": P(batch, None), "gates": P(batch, None)} if return_routing else None
    fn = jax.shard_map(local, mesh=mesh,
                       in_specs=(P(batch, None), P(), P(), P(), w_in, w_in, w_out, P(batch), P(batch), P()),
                       out_specs=(P(batch, None), P(), P(), P(), info_spec), check_vma=False)
    return fn(x_td, router.w, router.bias, noise_w, *experts, valid_t, token_ids_t, key)


class MoEBlock(nnx.Module):
    """Router + `num_experts` routed SwiGLU experts (+ shared experts, optionally sigmoid-gated).

    Parameters: router [D, E] (+ router_noise [D, E] for routers that draw noise), router_bias [E]
    (a `RouterBias`, not trained by gradients), w_gate / w_up [E, D, F], w_down [E, F, D]; shared
    experts as one SwiGLU of width num_shared * d_shared, and shared_gate [D, 1] (Qwen2-MoE)."""

    def __init__(self, cfg: ModelConfig, num_experts: int | None = None, *, rngs: nnx.Rngs):
        m = cfg.moe
        d, f, std = cfg.d_model, m.d_expert, cfg.init_std
        e = num_experts or m.num_experts
        self.cfg = m
        self.router = param(rngs, (d, e), ("embed", None), std)
        self.router_bias = RouterBias(jnp.zeros((e,), jnp.float32), logical_axes=(None,))
        self.router_noise = (param(rngs, (d, e), ("embed", None), std)
                             if routing.ROUTERS.get(m.router).noise_weights else None)
        self.w_gate = param(rngs, (e, d, f), ("exp", "embed", "mlp"), std)
        self.w_up = param(rngs, (e, d, f), ("exp", "embed", "mlp"), std)
        self.w_down = param(rngs, (e, f, d), ("exp", "mlp", "embed"), std)
        # n shared experts of width F equal one SwiGLU of width n*F (their outputs are summed).
        self.shared = (SwiGLU(d, m.num_shared_experts * (m.d_shared or f), std=std, rngs=rngs)
                       if m.num_shared_experts else None)
        self.shared_gate = (param(rngs, (d, 1), ("embed", None), std)
                            if m.num_shared_experts and m.shared_gate else None)

    def __call__(self, x_btd: jax.Array, *, valid_bt: jax.Array | None = None,
                 token_ids_bt: jax.Array | None = None, rng: jax.Array | None = None,
                 return_routing: bool = False) -> MoEOutput:
        b, t, d = x_btd.shape
        dt = x_btd.dtype
        x_td = x_btd.reshape(b * t, d)
        experts = dispatch_lib.ExpertWeights(self.w_gate[...].astype(dt), self.w_up[...].astype(dt),
                                              self.w_down[...].astype(dt))
        router = RouterInputs(self.router[...], jax.lax.stop_gradient(self.router_bias[...]),
                              None if self.router_noise is None else self.router_noise[...])
        valid_t = jnp.ones((b * t,), bool) if valid_bt is None else valid_bt.reshape(-1)
        tokens_t = jnp.zeros((b * t,), jnp.int32) if token_ids_bt is None else token_ids_bt.reshape(-1)
        mesh = parallel.active_mesh()
        kw = dict(rng=rng, seq_len=t, return_routing=return_routing)
        if mesh is None or mesh.size == 1:
            y_td, stats, dropped, n, info = routed_experts(x_td, router, experts, valid_t, tokens_t,
                                                           self.cfg, **kw)
        else:
            y_td, stats, dropped, n, info = sharded_routed_experts(mesh, x_td, router, experts, valid_t,
                                                                   tokens_t, self.cfg, **kw)
        if self.shared is not None:
            shared = self.shared(x_td)
            if self.shared_gate is not None:
                gate = jax.nn.sigmoid(x_td.astype(jnp.float32) @ self.shared_gate[...])
                shared = shared * gate.astype(dt)
            y_td = y_td + shared
        if info is not None:
            info = {k: v.reshape(b, t, -1) for k, v in info.items()}
        return MoEOutput(y_td.reshape(b, t, d), stats, dropped, n, info)

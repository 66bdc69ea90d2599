"""The MoE block: router -> dispatch -> experts -> combine (+ shared experts).

The block holds parameters only; the math is the registered router and dispatcher functions. Its
statistics leave as sums (`RouterStats`), so a sharded caller can reduce them before taking losses.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.config import ModelConfig
from moejax.model import dispatch as dispatch_lib
from moejax.model import routing
from moejax.model.layers import SwiGLU, param


class MoEOutput(NamedTuple):
    y: jax.Array                  # [B, T, D]
    stats: routing.RouterStats    # sums over this call's tokens
    dropped: jax.Array            # int32[]: assignments dropped by capacity
    assignments: jax.Array        # int32[]: assignments routed (N)


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
        b, t, d = x_btd.shape
        dt = x_btd.dtype
        x_td = x_btd.reshape(b * t, d)
        # Router in float32 whatever the compute dtype (Switch Transformer, sec. 2.4).
        logits_te = x_td.astype(jnp.float32) @ self.router[...]
        ctx = routing.RouteContext(rng=rng, token_ids=None if token_ids_bt is None
                                   else token_ids_bt.reshape(-1))
        r = routing.ROUTERS.get(self.cfg.router)(logits_te, self.cfg, ctx)
        experts = dispatch_lib.ExpertWeights(self.w_gate[...].astype(dt), self.w_up[...].astype(dt),
                                              self.w_down[...].astype(dt))
        y_td, dropped = dispatch_lib.DISPATCHERS.get(self.cfg.dispatch)(x_td, experts, r, self.cfg)
        if self.shared is not None:
            y_td = y_td + self.shared(x_td)
        valid_t = None if valid_bt is None else valid_bt.reshape(-1)
        stats = routing.router_stats(r, valid_t)
        n = jnp.asarray(r.token.shape[0], jnp.int32)
        return MoEOutput(y_td.reshape(b, t, d), stats, dropped, n)

"""The decoder: embed -> blocks (attention + dense or MoE FFN) -> norm -> LM head."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import parallel
from moejax.config import ModelConfig
import moejax.model.routing as routing
from moejax.model.attention import ATTENTIONS
from moejax.model.layers import RMSNorm, SwiGLU, param
from moejax.model.moe import MoEBlock


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x)); ffn is SwiGLU or MoE."""

    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = ATTENTIONS.get(cfg.attention)(cfg, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(layer)
        moe_index = sum(cfg.is_moe_layer(i) for i in range(layer))
        self.ffn = (MoEBlock(cfg, cfg.moe.experts_of(moe_index), rngs=rngs) if self.is_moe
                    else SwiGLU(cfg.d_model, cfg.d_ff, std=cfg.init_std, rngs=rngs))

    def __call__(self, x, positions, segment_ids, valid, tokens, rng=None, return_routing=False):
        """Returns the new residual stream and the MoE output (None for a dense FFN)."""
        x = x + self.attn(self.attn_norm(x), positions, segment_ids)
        h = self.ffn_norm(x)
        if not self.is_moe:
            return x + self.ffn(h), None
        out = self.ffn(h, valid_bt=valid, token_ids_bt=tokens, rng=rng, return_routing=return_routing)
        return x + out.y, out


class Transformer(nnx.Module):
    """Llama-style decoder whose FFNs are (every N-th, after the first K) MoE blocks.

    `model(tokens[B, T]) -> (logits f32[B, T, V], aux)`; aux holds
      aux_loss          mean over MoE layers of the Switch load-balancing loss (1.0 = balanced)
      z_loss            mean over MoE layers of the router z-loss
      (and every other loss of `routing.LOSSES`: seq_aux_loss, device_loss, importance_loss, load_loss)
      expert_load       f32[L_moe, E_max]: assignments routed to each expert, per MoE layer (layers
                        with fewer experts padded with zeros)
      dropped_fraction  dropped / routed assignments over all MoE layers (capacity dispatch)
      routing           with return_routing=True: per MoE layer {probs, gates: f32[B, T, E_l]}
    `segment_ids` (int[B, T], 0 = padding) keep attention inside packed examples and padding out of
    the routing statistics; `positions` (int[B, T]) restart RoPE positions per example; `rng` feeds
    random routers (GShard, noisy top-k); without it they route deterministically.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 remat: bool = False):
        self.cfg = cfg
        self.dtype = jnp.dtype(dtype)
        self.remat = remat
        self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std)
        self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = (None if cfg.tie_embeddings
                     else param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std))

    def __call__(self, tokens_bt: jax.Array, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, *, rng: jax.Array | None = None,
                 return_routing: bool = False) -> tuple[jax.Array, dict[str, Any]]:
        x, aux = self.features(tokens_bt, segment_ids, positions, rng=rng, return_routing=return_routing)
        logits = jnp.einsum("btd,dv->btv", x, self.head_weight(), preferred_element_type=jnp.float32)
        return parallel.constrain(logits, ("batch", "length", "vocab")), aux

    def head_weight(self) -> jax.Array:
        """The LM head [D, V] in the compute dtype (the embedding's transpose when tied)."""
        head = self.embed[...].T if self.head is None else self.head[...]
        return head.astype(self.dtype)

    def features(self, tokens_bt: jax.Array, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, *, rng: jax.Array | None = None,
                 return_routing: bool = False) -> tuple[jax.Array, dict[str, Any]]:
        """The final-normed hidden states [B, T, D] (the LM head's input) and aux: what the train
        step feeds to the fused head + loss (`losses.head_loss_sum`)."""
        b, t = tokens_bt.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        valid = None if segment_ids is None else segment_ids != 0
        segs = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids

        x = jnp.take(self.embed[...], tokens_bt, axis=0).astype(self.dtype)
        x = parallel.constrain(x, ("batch", "length", "act_embed"))
        moe_outs = []
        # Rematerialisation: keep only each block's input for the backward pass, recompute the rest.
        run = nnx.remat(lambda blk, *a: blk(*a), static_argnums=(7,)) if self.remat else \
            (lambda blk, *a: blk(*a))
        for i, block in enumerate(self.blocks):
            key = None if rng is None else jax.random.fold_in(rng, i)
            x, out = run(block, x, positions, segs, valid, tokens_bt, key, return_routing)
            if out is not None:
                moe_outs.append(out)
        x = self.final_norm(x)
        aux = moe_aux(moe_outs, self.cfg.moe, device_groups(self.cfg.moe))
        if return_routing:
            aux["routing"] = [o.routing for o in moe_outs]
        return x, aux


def device_groups(m) -> int:
    """Expert groups of the device-level loss: the config's, else the mesh's expert axis size."""
    if m.device_groups:
        return m.device_groups
    mesh = parallel.active_mesh()
    return mesh.shape["expert"] if mesh is not None else 1


def moe_aux(outs: list, m, groups: int = 1) -> dict[str, jax.Array]:
    """Per-model auxiliary outputs from the MoE layers' statistics: every registered router loss
    (mean over MoE layers), the per-layer expert load and the dropped fraction."""
    zero = jnp.zeros((), jnp.float32)
    if not outs:
        aux = {name: zero for name in routing.LOSSES.names()}
        return {**aux, "expert_load": jnp.zeros((0, m.max_experts)), "dropped_fraction": zero}
    aux = {}
    for name in routing.LOSSES.names():
        fn = routing.LOSSES.get(name)
        g = groups if all(o.stats.counts.shape[0] % groups == 0 for o in outs) else 1
        aux[name] = jnp.mean(jnp.stack([fn(o.stats, g) for o in outs]))
    width = m.max_experts
    load = jnp.stack([jnp.pad(o.stats.counts, (0, width - o.stats.counts.shape[0])) for o in outs])
    dropped = sum(o.dropped for o in outs) / sum(o.assignments for o in outs)
    return {**aux, "expert_load": load, "dropped_fraction": dropped.astype(jnp.float32)}

"""The decoder: embed -> blocks (attention + dense or MoE FFN) -> norm -> LM head."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import parallel
from moejax.config import ModelConfig
from moejax.model import routing
from moejax.model.attention import Attention, attention_mask
from moejax.model.layers import RMSNorm, SwiGLU, param
from moejax.model.moe import MoEBlock


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x)); ffn is SwiGLU or MoE."""

    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(layer)
        self.ffn = (MoEBlock(cfg, rngs=rngs) if self.is_moe
                    else SwiGLU(cfg.d_model, cfg.d_ff, std=cfg.init_std, rngs=rngs))

    def __call__(self, x, positions, mask, valid, tokens):
        """Returns the new residual stream and the MoE output (None for a dense FFN)."""
        x = x + self.attn(self.attn_norm(x), positions, mask)
        h = self.ffn_norm(x)
        if not self.is_moe:
            return x + self.ffn(h), None
        out = self.ffn(h, valid_bt=valid, token_ids_bt=tokens)
        return x + out.y, out


class Transformer(nnx.Module):
    """Llama-style decoder whose FFNs are (every N-th, after the first K) MoE blocks.

    `model(tokens[B, T]) -> (logits f32[B, T, V], aux)`; aux holds
      aux_loss          mean over MoE layers of the Switch load-balancing loss (1.0 = balanced)
      z_loss            mean over MoE layers of the router z-loss
      expert_load       f32[L_moe, E]: assignments routed to each expert, per MoE layer
      dropped_fraction  dropped / routed assignments over all MoE layers (capacity dispatch)
    `segment_ids` (int[B, T], 0 = padding) keep attention inside packed examples and padding out of
    the routing statistics; `positions` (int[B, T]) restart RoPE positions per example.
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
                 positions: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        b, t = tokens_bt.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        valid = None if segment_ids is None else segment_ids != 0
        mask = attention_mask(jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids)

        x = jnp.take(self.embed[...], tokens_bt, axis=0).astype(self.dtype)
        x = parallel.constrain(x, ("batch", "length", "act_embed"))
        moe_outs = []
        # Rematerialisation: keep only each block's input for the backward pass, recompute the rest.
        run = nnx.remat(lambda blk, *a: blk(*a)) if self.remat else (lambda blk, *a: blk(*a))
        for block in self.blocks:
            x, out = run(block, x, positions, mask, valid, tokens_bt)
            if out is not None:
                moe_outs.append(out)
        x = self.final_norm(x)
        head = self.embed[...].T if self.head is None else self.head[...]
        logits = jnp.einsum("btd,dv->btv", x, head.astype(self.dtype),
                            preferred_element_type=jnp.float32)
        logits = parallel.constrain(logits, ("batch", "length", "vocab"))
        return logits, moe_aux(moe_outs, self.cfg.moe.num_experts)


def moe_aux(outs: list, num_experts: int) -> dict[str, jax.Array]:
    """Per-model auxiliary outputs from the MoE layers' statistics."""
    if not outs:
        zero = jnp.zeros((), jnp.float32)
        return {"aux_loss": zero, "z_loss": zero, "expert_load": jnp.zeros((0, num_experts)),
                "dropped_fraction": zero}
    stats = jax.tree.map(lambda *xs: jnp.stack(xs), *[o.stats for o in outs])
    aux = jnp.mean(jax.vmap(routing.load_balancing_loss)(stats))
    z = jnp.mean(jax.vmap(routing.z_loss)(stats))
    dropped = sum(o.dropped for o in outs) / sum(o.assignments for o in outs)
    return {"aux_loss": aux, "z_loss": z, "expert_load": stats.counts,
            "dropped_fraction": dropped.astype(jnp.float32)}

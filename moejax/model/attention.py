"""Grouped-query attention with RoPE, causal within packed segments."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.config import ModelConfig
from moejax.model.layers import param, rope


def attention_mask(segment_ids_bt: jax.Array) -> jax.Array:
    """[B, 1, 1, T, S] boolean: causal, and query and key in the same packed segment."""
    t = segment_ids_bt.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    same = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
    return (causal & same)[:, None, None, :, :]


class Attention(nnx.Module):
    """Llama-style GQA: n_heads query heads share n_kv_heads key/value heads (Ainslie et al. 2023)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
        std = cfg.init_std
        self.wq = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), std)
        self.wk = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), std)
        self.wv = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), std)
        self.wo = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), std)
        self.rope_theta = cfg.rope_theta

    def __call__(self, x_btd: jax.Array, positions_bt: jax.Array, mask: jax.Array) -> jax.Array:
        dt = x_btd.dtype
        q = jnp.einsum("btd,dnh->btnh", x_btd, self.wq[...].astype(dt))
        k = jnp.einsum("btd,dkh->btkh", x_btd, self.wk[...].astype(dt))
        v = jnp.einsum("btd,dkh->btkh", x_btd, self.wv[...].astype(dt))
        q = rope(q, positions_bt, self.rope_theta)
        k = rope(k, positions_bt, self.rope_theta)
        b, t, n, hd = q.shape
        kv = k.shape[2]
        q = q.reshape(b, t, kv, n // kv, hd)  # query heads grouped under their KV head
        scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
        scores = scores * (hd ** -0.5)
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        out = jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(b, t, n, hd)
        return jnp.einsum("btnh,nhd->btd", out, self.wo[...].astype(dt))

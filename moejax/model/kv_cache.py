"""KV-cache forward pass for decoding (registry `CACHED_ATTENTIONS`, keyed like `model.attention`).

A separate code path next to the training forward: it reads the same parameters and calls the same
pieces (`Attention.qkv`, `grouped_attention`, `Attention.combine`), but writes each new token's keys and
values into a fixed-size per-layer cache and attends over that cache. The cache length is the
decode buffer (prompt bucket + max_new), not the training seq_len.

- gqa caches k, v [B, S, KV, hd] per KV head (after RoPE / qk-norm / bias).
- mla caches the compressed latent c [B, S, r_kv] (after its RMSNorm) and the roped shared key
  k_rope [B, S, rope] (DeepSeek-V2 sec. 2.1.2); per-head keys/values are re-expanded from c.

Rows are right-padded: row b's token at position p is written at cache index p, so each row keeps
its own length. Query at position p sees cache indices j <= p (and p - j < window with a sliding
window); indices past a row's length hold stale padding and are always masked.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.model.attention import grouped_attention
from moejax.registry import Registry

Cache = dict[str, jax.Array]
CACHED_ATTENTIONS: Registry[Callable] = Registry("cached attention")
CACHE_SHAPES: Registry[Callable] = Registry("kv cache shape")


def cache_mask(positions_bt: jax.Array, length: int, window: int | None) -> jax.Array:
    """[B, 1, 1, T, S]: query at position p sees cache slots j <= p (and p - j < window)."""
    j = jnp.arange(length)[None, None, :]
    p = positions_bt[:, :, None]
    ok = j <= p
    if window is not None:
        ok = ok & (p - j < window)
    return ok[:, None, None, :, :]


def _write(buf: jax.Array, new: jax.Array, positions_bt: jax.Array) -> jax.Array:
    """buf[b, positions[b, t]] = new[b, t] for every row (each row at its own positions)."""
    rows = jnp.arange(buf.shape[0])[:, None]
    return buf.at[rows, positions_bt].set(new.astype(buf.dtype))


@CACHE_SHAPES.register("gqa")
def _gqa_shapes(cfg, batch: int, length: int) -> dict[str, tuple[int, ...]]:
    kv, hd = cfg.n_kv_heads, cfg.resolved_head_dim
    return {"k": (batch, length, kv, hd), "v": (batch, length, kv, hd)}


@CACHED_ATTENTIONS.register("gqa")
def _gqa_cached(attn, x_btd, positions_bt, cache: Cache) -> tuple[jax.Array, Cache]:
    dt = x_btd.dtype
    q, k, v = attn.qkv(x_btd, positions_bt)
    cache = {"k": _write(cache["k"], k, positions_bt), "v": _write(cache["v"], v, positions_bt)}
    mask = cache_mask(positions_bt, cache["k"].shape[1], attn.spec.window)
    out = grouped_attention(q, cache["k"].astype(dt), cache["v"].astype(dt), mask, attn.spec.scale)
    return attn.combine(x_btd, out), cache


@CACHE_SHAPES.register("mla")
def _mla_shapes(cfg, batch: int, length: int) -> dict[str, tuple[int, ...]]:
    return {"c": (batch, length, cfg.mla.kv_lora_rank), "k_rope": (batch, length, cfg.mla.qk_rope_head_dim)}


@CACHED_ATTENTIONS.register("mla")
def _mla_cached(attn, x_btd, positions_bt, cache: Cache) -> tuple[jax.Array, Cache]:
    dt = x_btd.dtype
    if attn.wq is not None:
        q = jnp.einsum("btd,dnh->btnh", x_btd, attn.wq[...].astype(dt))
    else:
        q = jnp.einsum("btr,rnh->btnh", attn.q_a_norm(x_btd @ attn.wq_a[...].astype(dt)),
                       attn.wq_b[...].astype(dt))
    q_nope, q_rope = q[..., :attn.nope], q[..., attn.nope:]
    ckv = x_btd @ attn.wkv_a[...].astype(dt)
    c, k_rope = attn.kv_a_norm(ckv[..., :attn.r_kv]), ckv[..., attn.r_kv:]
    k_rope = attn._rope(k_rope[:, :, None, :], positions_bt)[:, :, 0, :]
    cache = {"c": _write(cache["c"], c, positions_bt), "k_rope": _write(cache["k_rope"], k_rope, positions_bt)}
    c_all, kr_all = cache["c"].astype(dt), cache["k_rope"].astype(dt)
    kv = jnp.einsum("bsr,rnh->bsnh", c_all, attn.wkv_b[...].astype(dt))
    k_nope, v = kv[..., :attn.nope], kv[..., attn.nope:]
    q = jnp.concatenate([q_nope, attn._rope(q_rope, positions_bt)], axis=-1)
    k = jnp.concatenate([k_nope, jnp.broadcast_to(kr_all[:, :, None, :], (*k_nope.shape[:3], attn.rope_dim))], -1)
    mask = cache_mask(positions_bt, c_all.shape[1], attn.spec.window)
    out = grouped_attention(q, k, v, mask, attn.spec.scale)
    return jnp.einsum("btnv,nvd->btd", out, attn.wo[...].astype(dt)), cache


def init_cache(model: nnx.Module, batch: int, length: int) -> list[Cache]:
    """Zeroed per-layer caches for `batch` rows of `length` slots, in the model's compute dtype."""
    shapes = CACHE_SHAPES.get(model.cfg.attention)(model.cfg, batch, length)
    return [{k: jnp.zeros(s, model.dtype) for k, s in shapes.items()} for _ in model.blocks]


def forward_cached(model: nnx.Module, tokens_bt: jax.Array, positions_bt: jax.Array, caches: list[Cache],
                   valid_bt: jax.Array | None = None) -> tuple[jax.Array, list[Cache]]:
    """Logits f32[B, T, V] of `tokens` at `positions` (written into the caches), and the new caches.
    Same blocks as `Transformer.__call__` (pre-norm attention, dense or MoE FFN, final norm, head),
    with the attention reading and writing the cache. MoE layers route deterministically."""
    attend = CACHED_ATTENTIONS.get(model.cfg.attention)
    valid = jnp.ones(tokens_bt.shape, bool) if valid_bt is None else valid_bt
    x = jnp.take(model.embed[...], tokens_bt, axis=0).astype(model.dtype)
    new_caches = []
    for block, cache in zip(model.blocks, caches):
        a, cache = attend(block.attn, block.attn_norm(x), positions_bt, cache)
        new_caches.append(cache)
        x = x + a
        h = block.ffn_norm(x)
        if block.is_moe:
            x = x + block.ffn(h, valid_bt=valid, token_ids_bt=tokens_bt).y
        else:
            x = x + block.ffn(h)
    x = model.final_norm(x)
    head = model.embed[...].T if model.head is None else model.head[...]
    logits = jnp.einsum("btd,dv->btv", x, head.astype(model.dtype), preferred_element_type=jnp.float32)
    return logits, new_caches

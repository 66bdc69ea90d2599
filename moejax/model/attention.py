"""Attention variants (registry `ATTENTIONS`, key `model.attention`) and RoPE with its scalings.

- `gqa`: grouped-query attention (Ainslie et al. 2023) as in Llama, with the options of the
  families moejax imports: q/k/v biases (Qwen2), RMSNorm over the projected q and k (OLMoE),
  a sliding window (Mistral), and attention experts (LLaMA-MoE-v2).
- `mla`: multi-head latent attention (DeepSeek-V2, arXiv:2405.04434, sec. 2.1), as Hugging Face
  `DeepseekV3Attention` computes it.

Every variant is `cls(cfg, rngs=rngs)` called as `attn(x[B, T, D], positions[B, T], segment_ids[B, T])
-> [B, T, D]`: causal, each query inside its packed segment. How softmax(q k^T) v itself is computed
(dense XLA, blockwise, Pallas / cuDNN kernels) is `model.attention_impl`, from the registry in
`moejax.model.attention_impl`. Scores and softmax run in float32.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.config import ModelConfig, RopeScalingConfig
from moejax.model.attention_impl import AttnSpec, attend, grouped_attention  # noqa: F401 (API)
from moejax.model.layers import RMSNorm, param
from moejax.registry import Registry

ATTENTIONS: Registry[type] = Registry("attention")
ROPE_SCALINGS: Registry[Callable[[RopeScalingConfig, float, int], tuple[np.ndarray, float]]] = \
    Registry("rope scaling")


def attention_spec(cfg: ModelConfig, scale: float) -> AttnSpec:
    return AttnSpec(cfg.attention_impl, scale, cfg.sliding_window, cfg.attention_block_q,
                    cfg.attention_block_kv)


def attention_mask(segment_ids_bt: jax.Array) -> jax.Array:
    """[B, 1, 1, T, S] boolean: causal, and query and key in the same packed segment (the dense
    reference's mask; `attention_impl.dense_mask` adds the window)."""
    t = segment_ids_bt.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    same = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
    return (causal & same)[:, None, None, :, :]


# ----------------------------------------------------------------------------------------------
# RoPE (Su et al. 2021), rotate-half layout, with the frequency scalings of long-context checkpoints.
# Each scaling maps (config, base, rotary dim) to (inverse frequencies [dim/2], cos/sin factor), in
# float32 numpy, the same arithmetic as transformers' modeling_rope_utils.


def _base_inv_freq(base: float, dim: int) -> np.ndarray:
    return (1.0 / (np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))))


@ROPE_SCALINGS.register("default")
def _rope_default(rs: RopeScalingConfig, base: float, dim: int) -> tuple[np.ndarray, float]:
    return _base_inv_freq(base, dim), 1.0


@ROPE_SCALINGS.register("linear")
def _rope_linear(rs: RopeScalingConfig, base: float, dim: int) -> tuple[np.ndarray, float]:
    """Position interpolation (Chen et al. 2023): every frequency divided by the factor."""
    return _base_inv_freq(base, dim) / np.float32(rs.factor), 1.0


@ROPE_SCALINGS.register("llama3")
def _rope_llama3(rs: RopeScalingConfig, base: float, dim: int) -> tuple[np.ndarray, float]:
    """Llama 3.1: long wavelengths divided by the factor, short ones kept, a smooth ramp between."""
    inv = _base_inv_freq(base, dim)
    old = rs.original_max_position_embeddings
    low_wavelen, high_wavelen = old / rs.low_freq_factor, old / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = (old / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32), 1.0


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@ROPE_SCALINGS.register("yarn")
def _rope_yarn(rs: RopeScalingConfig, base: float, dim: int) -> tuple[np.ndarray, float]:
    """YaRN (Peng et al. 2023): frequencies interpolated below beta_slow rotations, kept above
    beta_fast, a linear ramp between; cos/sin scaled by the attention factor."""
    factor, old = rs.factor, rs.original_max_position_embeddings
    att = rs.attention_factor
    if att is None:
        att = (yarn_mscale(factor, rs.mscale) / yarn_mscale(factor, rs.mscale_all_dim)
               if rs.mscale and rs.mscale_all_dim else yarn_mscale(factor))
    correction = lambda rot: dim * math.log(old / (rot * 2 * math.pi)) / (2 * math.log(base))
    low, high = correction(rs.beta_fast or 32), correction(rs.beta_slow or 1)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep = (1 - ramp).astype(np.float32)
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    inv = (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    return inv.astype(np.float32), float(att)


class Rope(NamedTuple):
    """Static RoPE settings of one attention (hashable, so no array becomes module state)."""
    scaling: RopeScalingConfig
    theta: float
    dim: int

    def tables(self) -> tuple[np.ndarray, float]:
        return ROPE_SCALINGS.get(self.scaling.type)(self.scaling, self.theta, self.dim)


def rope_tables(cfg: ModelConfig, dim: int) -> tuple[np.ndarray, float]:
    return Rope(cfg.rope_scaling, cfg.rope_theta, dim).tables()


def apply_rope(x_btnh: jax.Array, positions_bt: jax.Array, inv_freq: np.ndarray,
               factor: float = 1.0) -> jax.Array:
    """Rotate-half RoPE (the Llama checkpoint layout), in float32, cos/sin scaled by `factor`."""
    angles_bth = positions_bt[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
    cos = (jnp.cos(angles_bth) * factor)[:, :, None, :]
    sin = (jnp.sin(angles_bth) * factor)[:, :, None, :]
    x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_btnh.dtype)


# ----------------------------------------------------------------------------------------------
# The shared core.


def window_mask(mask: jax.Array, positions_bt: jax.Array, window: int | None) -> jax.Array:
    """`mask` narrowed so each query sees only keys less than `window` positions back (Mistral)."""
    if window is None:
        return mask
    near = positions_bt[:, :, None] - positions_bt[:, None, :] < window
    return mask & near[:, None, None, :, :]


def expert_gates(x_btd: jax.Array, router_de: jax.Array, k: int) -> jax.Array:
    """Attention-expert gates f32[B, T, E]: softmax router, top k, chosen weights renormalised to sum
    to 1, zero elsewhere. The router runs in float32 (as the MoE router)."""
    probs = jax.nn.softmax(x_btd.astype(jnp.float32) @ router_de, axis=-1)
    top, idx = jax.lax.top_k(probs, k)
    top = top / jnp.sum(top, axis=-1, keepdims=True)
    return jnp.sum(top[..., None] * jax.nn.one_hot(idx, probs.shape[-1], dtype=jnp.float32), axis=-2)


# ----------------------------------------------------------------------------------------------
# The variants.


@ATTENTIONS.register("gqa")
class Attention(nnx.Module):
    """Grouped-query attention: n_heads query heads share n_kv_heads key/value heads.

    Parameters: wq [D, H, hd], wk / wv [D, KV, hd], wo [H, hd, D]; with `qkv_bias` bq [H, hd],
    bk / bv [KV, hd] (Qwen2); with `qk_norm` q_norm / k_norm RMSNorms over the whole projected q
    (H*hd) and k (KV*hd), before the head split (OLMoE); with `attn_experts` = E_a, router [D, E_a].

    Attention experts (LLaMA-MoE-v2, arXiv:2411.15708): the KV head groups are cut into E_a experts,
    each owning KV/E_a key/value heads, their query heads and those heads' rows of wo. Keys and values
    are computed for every token; a token's output is `attn_expert_scale` times the gate-weighted sum
    over its top `attn_top_k` experts of that expert's output projection. With top_k = E_a, a zero
    router and scale E_a every gate is 1/E_a * E_a and the output is the dense attention's. This
    reference form computes every expert for every token and gates the results (no FLOPs saved).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
        std = cfg.init_std
        self.wq = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), std)
        self.wk = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), std)
        self.wv = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), std)
        self.wo = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), std)
        bias = cfg.qkv_bias
        self.bq = param(rngs, (h, hd), ("heads", "head_dim"), 0.0) if bias else None
        self.bk = param(rngs, (kv, hd), ("kv_heads", "head_dim"), 0.0) if bias else None
        self.bv = param(rngs, (kv, hd), ("kv_heads", "head_dim"), 0.0) if bias else None
        self.q_norm = RMSNorm(h * hd, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(kv * hd, cfg.norm_eps) if cfg.qk_norm else None
        self.router = param(rngs, (d, cfg.attn_experts), ("embed", None), std) if cfg.attn_experts else None
        self.top_k, self.expert_scale = cfg.attn_top_k, cfg.attn_expert_scale
        self.spec = attention_spec(cfg, hd ** -0.5)
        self.rope = Rope(cfg.rope_scaling, cfg.rope_theta, hd)

    def _project(self, x_btd, w, b, norm):
        dt = x_btd.dtype
        y = jnp.einsum("btd,dnh->btnh", x_btd, w[...].astype(dt))
        if b is not None:
            y = y + b[...].astype(dt)
        if norm is not None:
            shape = y.shape
            y = norm(y.reshape(*shape[:2], -1)).reshape(shape)
        return y

    def qkv(self, x_btd: jax.Array, positions_bt: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q [B, T, n, hd], k and v [B, T, kv, hd], RoPE applied (also what the KV cache stores)."""
        q = self._project(x_btd, self.wq, self.bq, self.q_norm)
        k = self._project(x_btd, self.wk, self.bk, self.k_norm)
        v = self._project(x_btd, self.wv, self.bv, None)
        return (apply_rope(q, positions_bt, *self.rope.tables()),
                apply_rope(k, positions_bt, *self.rope.tables()), v)

    def combine(self, x_btd: jax.Array, out_btnh: jax.Array) -> jax.Array:
        """The output projection; with attention experts, each expert's heads gated by the router."""
        dt = x_btd.dtype
        wo = self.wo[...].astype(dt)
        if self.router is None:
            return jnp.einsum("btnh,nhd->btd", out_btnh, wo)
        e = self.router.shape[1]
        b, t, n, hd = out_btnh.shape
        per_expert = jnp.einsum("btenh,enhd->bted", out_btnh.reshape(b, t, e, n // e, hd),
                                wo.reshape(e, n // e, hd, -1))
        gates = expert_gates(x_btd, self.router[...], self.top_k) * self.expert_scale
        return jnp.einsum("bted,bte->btd", per_expert, gates.astype(dt))

    def __call__(self, x_btd: jax.Array, positions_bt: jax.Array, segment_ids_bt: jax.Array
                 ) -> jax.Array:
        q, k, v = self.qkv(x_btd, positions_bt)
        return self.combine(x_btd, attend(q, k, v, segment_ids_bt, positions_bt, self.spec))


# Hugging Face DeepseekV3RMSNorm(q_lora_rank / kv_lora_rank) is built with its default epsilon.
MLA_NORM_EPS = 1e-6


@ATTENTIONS.register("mla")
class MLAttention(nnx.Module):
    """Multi-head latent attention (DeepSeek-V2/V3). Keys and values come from a shared latent:
    c = RMSNorm(x @ wkv_a[:, :r_kv]) and [k_nope | v] = c @ wkv_b per head; a single rope key
    k_rope = x @ wkv_a[:, r_kv:] is shared by all heads. Queries: x @ wq, or through a low-rank
    bottleneck (wq_a, q_a_norm, wq_b). Each head's query/key is [nope | rope]; the softmax scale
    is (nope + rope)^-0.5 (times yarn's mscale^2 when the rope is scaled, as DeepSeek-V3).

    Parameters: wq [D, H, nope+rope] or wq_a [D, r_q], q_a_norm, wq_b [r_q, H, nope+rope];
    wkv_a [D, r_kv + rope], kv_a_norm, wkv_b [r_kv, H, nope + v], wo [H, v, D].
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        m, d, h, std = cfg.mla, cfg.d_model, cfg.n_heads, cfg.init_std
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        if m.q_lora_rank is None:
            self.wq = param(rngs, (d, h, qk), ("embed", "heads", "head_dim"), std)
            self.wq_a = self.q_a_norm = self.wq_b = None
        else:
            self.wq = None
            self.wq_a = param(rngs, (d, m.q_lora_rank), ("embed", None), std)
            self.q_a_norm = RMSNorm(m.q_lora_rank, MLA_NORM_EPS)
            self.wq_b = param(rngs, (m.q_lora_rank, h, qk), (None, "heads", "head_dim"), std)
        self.wkv_a = param(rngs, (d, m.kv_lora_rank + m.qk_rope_head_dim), ("embed", None), std)
        self.kv_a_norm = RMSNorm(m.kv_lora_rank, MLA_NORM_EPS)
        self.wkv_b = param(rngs, (m.kv_lora_rank, h, m.qk_nope_head_dim + m.v_head_dim),
                           (None, "heads", "head_dim"), std)
        self.wo = param(rngs, (h, m.v_head_dim, d), ("heads", "head_dim", "embed"), std)
        self.nope, self.rope_dim, self.r_kv = m.qk_nope_head_dim, m.qk_rope_head_dim, m.kv_lora_rank
        self.interleave = m.rope_interleave
        self.rope = Rope(cfg.rope_scaling, cfg.rope_theta, m.qk_rope_head_dim)
        rs = cfg.rope_scaling
        mscale = yarn_mscale(rs.factor, rs.mscale_all_dim) if rs.type != "default" and rs.mscale_all_dim \
            else 1.0
        self.spec = attention_spec(cfg, qk ** -0.5 * mscale * mscale)

    def _rope(self, x, positions):
        if self.interleave:  # pairs (x0, x1), (x2, x3) ... -> halves, then rotate-half (as HF)
            x = jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)
        return apply_rope(x, positions, *self.rope.tables())

    def __call__(self, x_btd: jax.Array, positions_bt: jax.Array, segment_ids_bt: jax.Array
                 ) -> jax.Array:
        dt = x_btd.dtype
        if self.wq is not None:
            q = jnp.einsum("btd,dnh->btnh", x_btd, self.wq[...].astype(dt))
        else:
            q_lat = self.q_a_norm(x_btd @ self.wq_a[...].astype(dt))
            q = jnp.einsum("btr,rnh->btnh", q_lat, self.wq_b[...].astype(dt))
        q_nope, q_rope = q[..., :self.nope], q[..., self.nope:]
        ckv = x_btd @ self.wkv_a[...].astype(dt)
        c, k_rope = self.kv_a_norm(ckv[..., :self.r_kv]), ckv[..., self.r_kv:]
        kv = jnp.einsum("btr,rnh->btnh", c, self.wkv_b[...].astype(dt))
        k_nope, v = kv[..., :self.nope], kv[..., self.nope:]
        q_rope = self._rope(q_rope, positions_bt)
        k_rope = self._rope(k_rope[:, :, None, :], positions_bt)
        q = jnp.concatenate([q_nope, q_rope], axis=-1)
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope, (*k_nope.shape[:3], self.rope_dim))], -1)
        out = attend(q, k, v, segment_ids_bt, positions_bt, self.spec)
        return jnp.einsum("btnv,nvd->btd", out, self.wo[...].astype(dt))

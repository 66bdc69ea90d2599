"""Attention variants against a plain numpy reference, attention experts' exactness, MLA, RoPE scalings."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import parallel
from moejax.config import ConfigError
from moejax.model.attention import (ATTENTIONS, ROPE_SCALINGS, Attention, MLAttention, attention_mask,
                                    expert_gates)
from moejax.model.layers import logical_axes, rope
from tests.conftest import tiny_config

B, T = 2, 10


def inputs(d=32, seed=0):
    x = np.random.default_rng(seed).normal(size=(B, T, d)).astype(np.float32)
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    return x, pos, jnp.ones((B, T), jnp.int32)  # segment ids: one segment


def build(cls, cfg, seed=1, std=0.3):
    """`cls(cfg)` with random values for every parameter (biases and norm scales too, so each option
    matters), drawn with numpy on an abstract module (no per-shape JAX initialiser compiles)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    fill = lambda x: ((1.0 if len(x.shape) == 1 else 0.0) + std * rng.normal(size=x.shape)).astype(np.float32)
    return nnx.merge(graphdef, jax.tree.map(fill, state))


@jax.jit
def run(attn, x, pos, mask):
    return attn(x, pos, mask)


gates = jax.jit(expert_gates, static_argnums=2)


def np_rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def np_rope(x, theta=10000.0):
    """Rotate-half RoPE over [B, T, n, hd] at positions 0..T-1."""
    hd = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    ang = np.arange(x.shape[1])[:, None] * inv
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    rot = np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)
    return x * cos[None, :, None] + rot * sin[None, :, None]


def np_attention(q, k, v, scale, window=None):
    """Per-head causal softmax attention; k/v repeated to the query heads as transformers' repeat_kv."""
    rep = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    s = np.einsum("btnh,bsnh->bnts", q, k) * scale
    t = np.arange(q.shape[1])
    ok = t[:, None] >= t[None, :]
    if window is not None:
        ok &= t[:, None] - t[None, :] < window
    s = np.where(ok, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, v)


def np_gqa(attn, x, cfg):
    p = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(attn, nnx.Param)))
    x = np.asarray(x, np.float64)
    q, k, v = (np.einsum("btd,dnh->btnh", x, p[w]) for w in ("wq", "wk", "wv"))
    if cfg.qkv_bias:
        q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
    if cfg.qk_norm:
        q = np_rms(q.reshape(B, T, -1), p["q_norm"]["scale"], cfg.norm_eps).reshape(q.shape)
        k = np_rms(k.reshape(B, T, -1), p["k_norm"]["scale"], cfg.norm_eps).reshape(k.shape)
    out = np_attention(np_rope(q), np_rope(k), v, q.shape[-1] ** -0.5, cfg.sliding_window)
    return np.einsum("btnh,nhd->btd", out, p["wo"])


@pytest.mark.parametrize("opts", [[], ["model.qkv_bias=true"], ["model.qk_norm=true"],
                                  ["model.sliding_window=3"],
                                  ["model.qkv_bias=true", "model.qk_norm=true", "model.sliding_window=4"]])
def test_gqa_options_match_numpy_reference(opts):
    cfg = tiny_config(*opts).model
    attn = build(Attention, cfg)
    x, pos, mask = inputs()
    np.testing.assert_allclose(run(attn, x, pos, mask), np_gqa(attn, x, cfg), rtol=1e-4, atol=1e-5)


def test_sliding_window_hides_old_keys():
    cfg = tiny_config("model.sliding_window=3").model
    attn = build(Attention, cfg)
    x, pos, mask = inputs()
    y = run(attn, x, pos, mask)
    x2 = x.copy()
    x2[:, :5] += 1.0  # tokens 0..4 are > 2 back from positions 8, 9
    y2 = run(attn, x2, pos, mask)
    np.testing.assert_array_equal(y[:, 7:], y2[:, 7:])
    assert not np.allclose(y[:, 5:7], y2[:, 5:7])


def test_default_rope_equals_layers_rope():
    from moejax.model.attention import apply_rope, rope_tables
    x = np.random.default_rng(0).normal(size=(B, T, 3, 8)).astype(np.float32)
    pos = np.broadcast_to(np.arange(T), (B, T))
    inv, factor = rope_tables(tiny_config().model, 8)
    np.testing.assert_allclose(apply_rope(x, pos, inv, factor), rope(x, pos, 10000.0), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Attention experts (LLaMA-MoE-v2).


def experts_cfg(e, k, scale, *extra):
    return tiny_config(f"model.attn_experts={e}", f"model.attn_top_k={k}",
                       f"model.attn_expert_scale={scale}", "model.n_heads=8", "model.n_kv_heads=4",
                       "model.head_dim=8", *extra).model


def test_attention_experts_all_chosen_zero_router_scale_e_equal_dense():
    for e in (2, 4):
        cfg = experts_cfg(e, e, float(e), "model.qkv_bias=true")
        moe = build(Attention, cfg)
        moe.router[...] = jnp.zeros_like(moe.router[...])
        dense_cfg = experts_cfg(0, 1, 1.0, "model.qkv_bias=true")
        dense = build(Attention, dense_cfg)
        nnx.update(dense, {k: v for k, v in nnx.to_pure_dict(nnx.state(moe, nnx.Param)).items()
                           if k != "router"})
        x, pos, mask = inputs()
        # Outputs reach |7|: the E-way sum of gated expert outputs and the dense form round in another
        # order, so float32 leaves ~2e-6 absolute on some CPUs (seen 1.9e-6 on this VM, 2026-12-02).
        np.testing.assert_allclose(run(moe, x, pos, mask), run(dense, x, pos, mask), rtol=1e-5, atol=1e-5)


def test_attention_expert_top1_is_its_heads_only():
    cfg = experts_cfg(2, 1, 1.0)
    attn = build(Attention, cfg, std=1.0)
    x, pos, mask = inputs()
    gates_bte = np.asarray(gates(x, attn.router[...], 1))
    assert set(np.unique(gates_bte)) <= {0.0, 1.0} and np.all(gates_bte.sum(-1) == 1.0)
    assert 0 < gates_bte[..., 0].sum() < B * T, "pick a seed where both experts are used"
    y = np.asarray(run(attn, x, pos, mask))
    # The same attention without experts, each expert's wo rows alone.
    dense = build(Attention, experts_cfg(0, 1, 1.0))
    params = {k: v for k, v in nnx.to_pure_dict(nnx.state(attn, nnx.Param)).items() if k != "router"}
    for e in range(2):
        wo = np.asarray(params["wo"]).copy()
        wo[[h for h in range(8) if h // 4 != e]] = 0.0  # expert e owns KV heads 2e, 2e+1 = q heads 4e..4e+3
        nnx.update(dense, {**params, "wo": jnp.asarray(wo)})
        chosen = gates_bte[..., e] == 1.0
        np.testing.assert_allclose(y[chosen], np.asarray(run(dense, x, pos, mask))[chosen],
                                   rtol=1e-5, atol=1e-6)


def test_attention_expert_gates_renormalised_and_output_scaled():
    attn = build(Attention, experts_cfg(4, 2, 3.0), std=1.0)
    x, pos, mask = inputs()
    g = np.asarray(gates(x, attn.router[...], 2))
    assert np.all((g > 0).sum(-1) == 2)
    np.testing.assert_allclose(g.sum(-1), 1.0, rtol=1e-6)
    grads = jax.jit(jax.grad(lambda r: jnp.sum(expert_gates(x, r, 2) ** 2)))(attn.router[...])
    assert float(jnp.abs(grads).sum()) > 0  # the router is trained through the gates
    unscaled = build(Attention, experts_cfg(4, 2, 1.0), std=1.0)  # the same draws
    np.testing.assert_allclose(run(attn, x, pos, mask), 3.0 * np.asarray(run(unscaled, x, pos, mask)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, message", [
    (["model.attn_experts=3"], "must divide model.n_kv_heads"),
    (["model.attn_experts=2", "model.attn_top_k=3"], "attn_top_k = 3 is out of range"),
    (["model.attention=mla", "model.qk_norm=true"], "model.qk_norm is for gqa"),
    (["model.attention=flash"], "allowed: gqa, mla"),
    (["model.rope_scaling.type=yarn"], "original_max_position_embeddings"),
    (["model.rope_scaling.type=ntk"], "allowed: default, linear, llama3, yarn"),
])
def test_config_checks(bad, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(*bad)


# ----------------------------------------------------------------------------------------------
# MLA.


def mla_cfg(*extra):
    return tiny_config("model.attention=mla", "model.n_heads=4", "model.mla.kv_lora_rank=12",
                       "model.mla.qk_rope_head_dim=8", "model.mla.qk_nope_head_dim=6",
                       "model.mla.v_head_dim=10", *extra).model


def np_mla(attn, x, cfg):
    """DeepseekV3Attention's forward, in numpy (interleaved rope: even/odd halves, as HF)."""
    m = cfg.mla
    p = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(attn, nnx.Param)))
    x = np.asarray(x, np.float64)
    if m.q_lora_rank is None:
        q = np.einsum("btd,dnh->btnh", x, p["wq"])
    else:
        q = np.einsum("btr,rnh->btnh", np_rms(x @ p["wq_a"], p["q_a_norm"]["scale"], 1e-6), p["wq_b"])
    ckv = x @ p["wkv_a"]
    kv = np.einsum("btr,rnh->btnh", np_rms(ckv[..., :m.kv_lora_rank], p["kv_a_norm"]["scale"], 1e-6),
                   p["wkv_b"])
    k_rot = ckv[..., None, m.kv_lora_rank:]
    q_pass, q_rot = q[..., :m.qk_nope_head_dim], q[..., m.qk_nope_head_dim:]
    if m.rope_interleave:
        q_rot = np.concatenate([q_rot[..., 0::2], q_rot[..., 1::2]], -1)
        k_rot = np.concatenate([k_rot[..., 0::2], k_rot[..., 1::2]], -1)
    q = np.concatenate([q_pass, np_rope(q_rot)], -1)
    k_rot = np.broadcast_to(np_rope(k_rot), (*kv.shape[:3], m.qk_rope_head_dim))
    k = np.concatenate([kv[..., :m.qk_nope_head_dim], k_rot], -1)
    out = np_attention(q, k, kv[..., m.qk_nope_head_dim:], (m.qk_nope_head_dim + m.qk_rope_head_dim) ** -0.5)
    return np.einsum("btnv,nvd->btd", out, p["wo"])


@pytest.mark.parametrize("opts", [[], ["model.mla.q_lora_rank=16"], ["model.mla.rope_interleave=false"]])
def test_mla_matches_numpy_reference(opts):
    cfg = mla_cfg(*opts)
    attn = build(MLAttention, cfg)
    x, pos, mask = inputs()
    np.testing.assert_allclose(run(attn, x, pos, mask), np_mla(attn, x, cfg), rtol=1e-4, atol=1e-5)


def test_every_parameter_gets_gradients_and_has_known_logical_axes():
    for cfg in (mla_cfg("model.mla.q_lora_rank=16"),
                tiny_config("model.qkv_bias=true", "model.qk_norm=true", "model.attn_experts=2").model):
        attn = build(ATTENTIONS.get(cfg.attention), cfg)
        x, pos, mask = inputs()
        graphdef, params = nnx.split(attn)
        grads = jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x, pos, mask) ** 2)))(params)
        for path, g in nnx.to_flat_state(grads):
            assert np.abs(np.asarray(g[...])).sum() > 0, f"no gradient reaches {path}"
        for path, var in nnx.to_flat_state(params):
            axes = logical_axes(var)
            assert axes is not None and len(axes) == var[...].ndim, path
            assert all(a is None or a in parallel.RULES for a in axes), (path, axes)


def test_registries():
    assert ATTENTIONS.names() == ["gqa", "mla"]
    assert ROPE_SCALINGS.names() == ["default", "linear", "llama3", "yarn"]

"""KV-cache decoding: greedy tokens identical to the no-cache reference for every attention variant;
the cached forward's logits equal the training forward's; sampling options."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.decode import generate, sample
from moejax.errors import UserError
from moejax.model import Transformer
from moejax.model.kv_cache import forward_cached, init_cache
from tests.conftest import tiny_config

MLA = ["model.attention=mla", "model.mla.kv_lora_rank=12", "model.mla.qk_rope_head_dim=8",
       "model.mla.qk_nope_head_dim=6", "model.mla.v_head_dim=10"]
VARIANTS = {
    "gqa": [],
    "gqa_window": ["model.sliding_window=5"],
    "gqa_qknorm_bias": ["model.qk_norm=true", "model.qkv_bias=true"],
    "attn_experts": ["model.attn_experts=2", "model.attn_top_k=1"],
    "mla": MLA,
    "mla_qlora_window": MLA + ["model.mla.q_lora_rank=10", "model.sliding_window=6"],
}
# Ragged prompts (right-padded in one batch); long enough that the window matters.
PROMPTS = [[3, 9, 4, 1, 7, 22, 5, 8, 13], [11, 2], [5, 6, 7, 8, 9, 10, 40, 41, 42, 43, 44, 45, 46]]


def _model(overrides):
    # A larger init std makes the logits peaked, so greedy choices are not float-rounding ties.
    cfg = tiny_config("model.init_std=0.3", *overrides)
    return Transformer(cfg.model, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.slow
def test_greedy_tokens_same_with_and_without_cache(variant):
    model = _model(VARIANTS[variant])
    kw = dict(max_new=12, stop_ids=[63], pad_id=0)
    ref = generate(model, PROMPTS, kv_cache=False, **kw)
    got = generate(model, PROMPTS, kv_cache=True, **kw)
    assert got == ref
    assert max(len(r) for r in ref) > 8  # not everything stopped at once


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["gqa_window", "mla", "attn_experts"])
def test_cached_logits_equal_training_forward(variant):
    """Prefill then token-by-token logits, against the full forward pass over the whole sequence."""
    model = _model(VARIANTS[variant])
    seq = jnp.asarray([[3, 9, 4, 1, 7, 22, 5, 8, 13, 30, 31, 2]], jnp.int32)
    want, _ = model(seq)
    p = 5
    caches = init_cache(model, 1, 16)
    pos = jnp.arange(seq.shape[1], dtype=jnp.int32)[None]
    logits, caches = forward_cached(model, seq[:, :p], pos[:, :p], caches)
    got = [logits]
    for t in range(p, seq.shape[1]):
        logits, caches = forward_cached(model, seq[:, t:t + 1], pos[:, t:t + 1], caches)
        got.append(logits)
    np.testing.assert_allclose(np.concatenate(got, axis=1), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_min_new_tokens_and_stop_ids():
    model = _model([])
    first = generate(model, [PROMPTS[0]], max_new=1, stop_ids=[])[0][0]
    # The first greedy token as a stop id ends every answer at once, unless min_new forbids it.
    assert generate(model, [PROMPTS[0]], max_new=6, stop_ids=[first]) == [[first]]
    for cache in (True, False):
        out = generate(model, [PROMPTS[0]], max_new=6, stop_ids=[first], min_new=4, kv_cache=cache)[0]
        assert first not in out[:4] and len(out) >= 4


def test_sampling_same_with_and_without_cache():
    model = _model([])
    kw = dict(max_new=8, stop_ids=[63], temperature=0.8, top_k=5, top_p=0.9, seed=3)
    assert generate(model, PROMPTS, kv_cache=True, **kw) == generate(model, PROMPTS, kv_cache=False, **kw)


def test_sample_top_k_top_p_support():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000))
    keys = jax.random.split(jax.random.key(0), 1)[0]
    draws = np.asarray(sample(logits, keys, temperature=1.0, top_k=2, top_p=1.0))
    assert set(draws.tolist()) == {0, 1}
    assert abs((draws == 0).mean() - 0.5 / 0.8) < 0.03
    # top_p = 0.7: tokens 0 (0.5) and 1 (0.3, mass before it 0.5 < 0.7) kept; 2 has 0.8 before it.
    draws = np.asarray(sample(logits, keys, temperature=1.0, top_k=0, top_p=0.7))
    assert set(draws.tolist()) == {0, 1}
    assert (np.asarray(sample(logits, keys, temperature=0.0, top_k=0, top_p=1.0)) == 0).all()


def test_prompt_longer_than_max_len():
    with pytest.raises(UserError, match="longer than the model's maximum length 4"):
        generate(_model([]), PROMPTS, max_new=2, stop_ids=[], max_len=4)

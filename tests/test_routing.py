"""Routers and router losses against hand-computed values."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.config import MoEConfig
from moejax.model import routing


def route(logits, k=2, renormalize=True):
    cfg = MoEConfig(num_experts=logits.shape[1], top_k=k, renormalize=renormalize)
    return routing.topk_router(jnp.asarray(logits, jnp.float32), cfg, routing.RouteContext())


def test_topk_picks_largest_in_choice_major_order():
    logits = np.array([[0.0, 3.0, 1.0, 2.0],
                       [5.0, 0.0, 4.0, 0.0],
                       [0.0, 0.0, 0.0, 9.0]])
    r = route(logits)
    # All first choices (tokens 0, 1, 2), then all second choices.
    np.testing.assert_array_equal(r.token, [0, 1, 2, 0, 1, 2])
    np.testing.assert_array_equal(r.expert[:3], [1, 0, 3])
    np.testing.assert_array_equal(r.expert[3:5], [3, 2])
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    top = np.array([[p[0, 1], p[0, 3]], [p[1, 0], p[1, 2]]])
    np.testing.assert_allclose(r.weight[:2], top[:, 0] / top.sum(1), rtol=1e-6)
    np.testing.assert_allclose(r.weight[3:5], top[:, 1] / top.sum(1), rtol=1e-6)
    np.testing.assert_allclose(r.probs, p, rtol=1e-6)


def test_topk_without_renormalisation_keeps_probabilities():
    logits = np.random.default_rng(0).normal(size=(5, 6))
    r = route(logits, k=2, renormalize=False)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(r.weight, p[np.asarray(r.token), np.asarray(r.expert)], rtol=1e-6)
    assert np.all(np.asarray(r.weight[:5]) + np.asarray(r.weight[5:]) < 1.0)


def test_router_is_float32_for_bf16_logits():
    r = route(np.zeros((2, 4)).astype(jnp.bfloat16))
    assert r.probs.dtype == jnp.float32 and r.weight.dtype == jnp.float32


def stats_of(expert, token, probs, logits=None, valid=None):
    t, e = probs.shape
    logits = np.log(probs) if logits is None else logits
    r = routing.Routing(jnp.asarray(token, jnp.int32), jnp.asarray(expert, jnp.int32),
                        jnp.ones(len(token)), jnp.asarray(probs, jnp.float32),
                        jnp.asarray(logits, jnp.float32))
    return routing.router_stats(r, None if valid is None else jnp.asarray(valid))


def test_balanced_router_scores_one():
    t, e = 8, 4
    probs = np.full((t, e), 1 / e)
    expert = np.arange(t) % e
    s = stats_of(expert, np.arange(t), probs)
    assert float(routing.load_balancing_loss(s)) == pytest.approx(1.0, abs=1e-6)


def test_collapsed_router_scores_num_experts():
    t, e = 6, 4
    probs = np.zeros((t, e)) + 1e-12
    probs[:, 2] = 1.0
    s = stats_of(np.full(t, 2), np.arange(t), probs)
    assert float(routing.load_balancing_loss(s)) == pytest.approx(e, rel=1e-5)


def test_load_balancing_loss_hand_computed():
    # 3 tokens, top-2 over 3 experts: 6 slots; expert 0 gets 3, expert 1 gets 2, expert 2 gets 1.
    probs = np.array([[0.5, 0.3, 0.2], [0.6, 0.1, 0.3], [0.2, 0.7, 0.1]])
    token = [0, 1, 2, 0, 1, 2]
    expert = [0, 0, 1, 1, 2, 0]
    f = np.array([3, 2, 1]) / 6
    p = probs.mean(0)
    s = stats_of(expert, token, probs)
    assert float(routing.load_balancing_loss(s)) == pytest.approx(3 * np.sum(f * p), rel=1e-6)


def test_z_loss_hand_computed():
    logits = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    lse = np.log(np.exp(logits).sum(1))
    s = stats_of([2, 0], [0, 1], np.exp(logits - lse[:, None]), logits)
    assert float(routing.z_loss(s)) == pytest.approx(np.mean(lse ** 2), rel=1e-6)


def test_padding_tokens_leave_statistics():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    s = stats_of([0, 1, 1], [0, 1, 2], probs, valid=[True, True, False])
    np.testing.assert_allclose(s.counts, [1, 1])
    np.testing.assert_allclose(s.prob_sum, [1.1, 0.9], rtol=1e-6)
    assert float(s.tokens) == 2


def test_stats_sum_across_shards_equals_whole():
    """Losses from summed per-shard statistics equal the losses of the whole batch."""
    logits = np.random.default_rng(1).normal(size=(10, 4))
    whole = routing.router_stats(route(logits))
    halves = [routing.router_stats(route(logits[:5])), routing.router_stats(route(logits[5:]))]
    summed = jax.tree.map(lambda a, b: a + b, *halves)
    for loss in (routing.load_balancing_loss, routing.z_loss):
        assert float(loss(summed)) == pytest.approx(float(loss(whole)), rel=1e-6)


def test_unknown_router_lists_allowed():
    with pytest.raises(KeyError, match="topk"):
        routing.ROUTERS.get("nope")

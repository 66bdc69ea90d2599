"""Compression keeps the function where the methods say it does (docs/compression.md)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import config, distill
from moejax.compress import common, extract, merge, mix, prune
from moejax.dense_to_moe import upcycle
from moejax.errors import UserError
from moejax.model import Transformer

DENSE = ["model.moe.num_experts=0", "model.n_layers=2", "model.vocab_size=48", "model.d_model=32",
         "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=16", "model.init_std=0.2"]
TOKS = jnp.asarray(np.random.default_rng(0).integers(0, 48, (2, 12)), jnp.int32)


def params_of(cfg, seed=0):
    return jax.tree.map(np.asarray, nnx.split(Transformer(cfg.model, rngs=nnx.Rngs(seed)))[1].to_pure_dict())


def logits(cfg, params, toks=TOKS, routing=False):
    model = common.to_model(cfg, params)
    out = jax.jit(lambda t: model(t, return_routing=routing))(toks)
    return out if routing else out[0]


@pytest.fixture(scope="module")
def dense():
    cfg = config.load(None, DENSE)
    return cfg, params_of(cfg)


@pytest.fixture(scope="module")
def moe8(dense):
    cfg, p = dense
    return upcycle(cfg, p, num_experts=8, top_k=2, router_std=0.5, seed=1)


def test_identical_experts_pruned_or_merged_keep_the_function(dense, moe8):
    want = logits(*dense)
    cfg, p = moe8
    usage = [np.arange(8.0)[::-1]] * 2
    for keep in (prune.by_random([8, 8], [4, 4], seed=3), prune.by_usage(usage, [4, 2])):
        c, q = prune.prune(cfg, p, keep)
        np.testing.assert_allclose(logits(c, q), want, rtol=1e-5, atol=1e-5)
    assert c.model.moe.layer_experts == (4, 2)
    for method in ("mcsmoe", "average"):
        q, maps = merge.merge(cfg, p, usage, [2, 2], method)
        assert all(len(np.unique(g)) == 2 for g in maps)
        np.testing.assert_allclose(logits(cfg, q), want, rtol=1e-5, atol=1e-5)
        assert merge.distinct_params(cfg, q, maps) < common.param_count(q)


def test_weight_matching_recovers_a_planted_permutation(rng):
    wg, wu, wd = rng.standard_normal((16, 24)), rng.standard_normal((16, 24)), rng.standard_normal((24, 16))
    planted = rng.permutation(24)
    other = merge.permute_expert(wg, wu, wd, planted)
    perm = merge.match_permutation((wg, wu, wd), other)
    for a, b in zip(merge.permute_expert(*other, perm), (wg, wu, wd)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(planted[perm], np.arange(24))
    # The permuted expert computes the same function (gate, up columns and down rows together).
    x = rng.standard_normal((5, 16))
    silu = lambda a: a / (1 + np.exp(-a))  # noqa: E731
    f = lambda g, u, d: (silu(x @ g) * (x @ u)) @ d  # noqa: E731
    np.testing.assert_allclose(f(*other), f(wg, wu, wd), rtol=1e-10)


def test_mcsmoe_groups_follow_router_similarity():
    router = np.array([[1.0, 0.0, 0.9, 0.1], [0.0, 1.0, 0.1, 0.9]])
    g = merge.groups(router, np.array([10.0, 9.0, 1.0, 1.0]), 2)
    np.testing.assert_array_equal(g, [0, 1, 0, 1])


@pytest.mark.parametrize("greedy", [False, True])
def test_reconstruction_pruning_drops_a_planted_never_used_zero_expert(monkeypatch, rng, greedy):
    cfg = config.load(None, ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.d_expert=8",
                             "model.d_model=16", "model.moe.renormalize=true"])
    d, e = 16, 4
    ffn = {"router": rng.normal(0, 0.1, (d, e)).astype(np.float32), "router_bias": np.zeros(e, np.float32),
           "w_gate": rng.standard_normal((e, d, 8)).astype(np.float32),
           "w_up": rng.standard_normal((e, d, 8)).astype(np.float32),
           "w_down": rng.standard_normal((e, 8, d)).astype(np.float32)}
    ffn["router"][:, 2] = -1.0  # with x >= 0, expert 2 always has the lowest logit: never chosen
    for k in ("w_gate", "w_up", "w_down"):
        ffn[k][2] = 0.0
    x = np.abs(rng.standard_normal((64, d))).astype(np.float32)
    full = prune.masked_output_fn(dataclasses.replace(cfg.model.moe, num_experts=4))
    z = full(jnp.asarray(x), ffn["router"], ffn["router_bias"], None, ffn["w_gate"], ffn["w_up"],
             ffn["w_down"], jnp.arange(4))
    if greedy:
        monkeypatch.setattr(prune, "EXHAUSTIVE_LIMIT", 0)
    fn = prune.masked_output_fn(dataclasses.replace(cfg.model.moe, num_experts=3))
    assert prune.reconstruct_layer(fn, x, z, ffn, 4, 3) == [0, 1, 3]


def test_extracted_subnetwork_equals_full_model_where_routing_stays_inside(rng):
    cfg = config.load(None, ["model.n_layers=1", "model.vocab_size=48", "model.d_model=32", "model.n_heads=4",
                             "model.n_kv_heads=2", "model.moe.num_experts=6", "model.moe.top_k=2",
                             "model.moe.d_expert=16", "model.init_std=0.3"])
    p = params_of(cfg)
    toks = jnp.asarray(rng.integers(0, 48, (4, 16)), jnp.int32)
    full, aux = logits(cfg, p, toks, routing=True)
    gates = np.asarray(aux["routing"][0]["gates"])
    # Mimic a tally: "domain 0" is these tokens; keep the 4 experts with most slots.
    tally = type("T", (), {"domains": ["d"], "tokens_d": np.array([64]),
                           "slots": [(gates > 0).reshape(-1, 6).sum(0)[None]]})()
    keep = extract.domain_experts(tally, "d", [4])
    c, q = prune.prune(cfg, p, keep)
    sub = np.asarray(logits(c, q, toks))
    inside = np.all(np.isin(np.argwhere(gates.reshape(-1, 6) > 0)[:, 1].reshape(-1, 2), keep), axis=1)
    inside = inside.reshape(4, 16)
    assert inside.sum() >= 8 and (~inside).sum() > 0
    np.testing.assert_allclose(sub[inside], np.asarray(full)[inside], rtol=1e-5, atol=1e-5)
    assert not np.allclose(sub[~inside], np.asarray(full)[~inside], atol=1e-5)
    with pytest.raises(UserError, match="not in the calibration data"):
        extract.domain_experts(tally, "nope", [4])


def test_mixture_of_one_model_is_that_model_and_merge_of_equal_models_too(dense, rng):
    cfg, p = dense
    want = logits(cfg, p)
    means = [[rng.standard_normal(32) for _ in range(2)]]
    c, q = mix.mix([cfg], [p], top_k=2, router_means=means)
    assert c.model.moe.num_experts == 1 and c.model.moe.top_k == 1
    np.testing.assert_allclose(logits(c, q), want, rtol=1e-5, atol=1e-5)
    c2, q2 = mix.merge_dense([cfg, cfg], [p, p], [0.3, 0.7])
    np.testing.assert_allclose(logits(c2, q2), want, rtol=1e-5, atol=1e-5)
    # Two models: experts are their FFNs, the rest the weighted mean.
    p2 = params_of(cfg, seed=5)
    c3, q3 = mix.mix([cfg, cfg], [p, p2], [0.25, 0.75])
    np.testing.assert_array_equal(q3["blocks"][0]["ffn"]["w_up"][1], p2["blocks"][0]["ffn"]["w_up"])
    np.testing.assert_allclose(q3["embed"], 0.25 * p["embed"] + 0.75 * p2["embed"], rtol=1e-6, atol=1e-7)
    logits(c3, q3)  # builds and runs


def test_bad_input_is_one_clear_line(dense, moe8):
    cfg, p = moe8
    for bad in ("8", "1", "4,4,4"):
        with pytest.raises(UserError, match="--keep"):
            common.keep_counts(bad, cfg)
    assert common.keep_counts("4,2", cfg) == [4, 2]
    dcfg, dp = dense
    other = config.load(None, DENSE[:-2] + ["model.d_ff=32"])
    with pytest.raises(UserError, match="another architecture"):
        mix.mix([dcfg, other], [dp, params_of(other)])


def test_kd_term_is_zero_for_equal_logits_and_positive_otherwise(rng):
    a = jnp.asarray(rng.standard_normal((2, 5, 11)), jnp.float32)
    m = jnp.ones((2, 5))
    assert float(distill.kd_loss_sum(a, a, m, 2.0)) == 0.0
    assert float(distill.kd_loss_sum(a, a * 1.5, m, 2.0)) > 0.0


@pytest.fixture(scope="module")
def step_setup():
    from moejax.optim import make_optimizer
    from moejax.train import init_state

    cfg = config.load(None, ["model.vocab_size=48", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
                             "model.n_kv_heads=2", "model.d_ff=32", "model.moe.num_experts=4",
                             "model.moe.d_expert=8", "model.moe.tile_size=8", "train.batch_size=2"])
    model = Transformer(cfg.model, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    teacher_cfg = config.load(None, ["model.vocab_size=48", "model.d_model=16", "model.n_layers=1",
                                     "model.n_heads=2", "model.n_kv_heads=1", "model.moe.num_experts=0",
                                     "model.d_ff=32"])
    t_graphdef, t_params = nnx.split(Transformer(teacher_cfg.model, rngs=nnx.Rngs(1)))
    opt = make_optimizer(cfg.train)
    r = np.random.default_rng(0)
    batches = [{"tokens": r.integers(0, 48, (2, 8)).astype(np.int32),
                "targets": r.integers(0, 48, (2, 8)).astype(np.int32),
                "loss_mask": np.ones((2, 8), np.float32), "segment_ids": np.ones((2, 8), np.int32),
                "positions": np.tile(np.arange(8, dtype=np.int32), (2, 1))} for _ in range(4)]
    return cfg, graphdef, params, t_graphdef, t_params, opt, batches, lambda: init_state(params, opt)


def _with_distill(cfg, **kw):
    return dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, distill=dataclasses.replace(cfg.train.distill, teacher="t", **kw)))


def test_alpha_zero_is_plain_training_bitwise(step_setup):
    """alpha = 0 with a teacher given is the plain step (the teacher is not run); alpha = 0.5 is not."""
    from moejax.train import make_train_step

    cfg, graphdef, _, t_graphdef, t_params, opt, batches, fresh = step_setup
    plain = jax.jit(make_train_step(graphdef, opt, cfg))
    kd0 = jax.jit(make_train_step(graphdef, opt, _with_distill(cfg, alpha=0.0), t_graphdef))
    kd5 = jax.jit(make_train_step(graphdef, opt, _with_distill(cfg, alpha=0.5), t_graphdef))
    assert not distill.active(_with_distill(cfg, alpha=0.0))
    a, b, c = fresh(), fresh(), fresh()
    for batch in batches[:2]:
        a, _ = plain(a, batch)
        b, _ = kd0(b, batch, t_params)
        c, _ = kd5(c, batch, t_params)
    for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a["params"]),
                                                          jax.tree.leaves(c["params"])))


def test_after_stop_step_training_is_plain_and_the_teacher_is_not_called(step_setup):
    from moejax.train import make_train_step

    cfg, graphdef, _, t_graphdef, t_params, opt, batches, fresh = step_setup
    dcfg = _with_distill(cfg, alpha=0.5, stop_step=2)
    plain = jax.jit(make_train_step(graphdef, opt, cfg))
    kd_jit = jax.jit(make_train_step(graphdef, opt, dcfg, t_graphdef))
    calls = []

    def kd(state, batch, tp):
        calls.append(1)
        return kd_jit(state, batch, tp)

    staged = distill.staged(kd, plain, t_params, 2, start=0)
    s = fresh()
    for batch in batches:
        s, _ = staged(s, batch)
    ref = fresh()
    for i, batch in enumerate(batches):
        ref, _ = kd_jit(ref, batch, t_params) if i < 2 else plain(ref, batch)
    assert len(calls) == 2
    for x, y in zip(jax.tree.leaves(s["params"]), jax.tree.leaves(ref["params"])):
        np.testing.assert_array_equal(x, y)
    resumed = distill.staged(kd, plain, t_params, 2, start=3)  # a run resumed past stop_step
    resumed(fresh(), batches[0])
    assert len(calls) == 2


def test_usage_pruning_ranks_by_routed_weight_not_slot_count():
    """Expert 1 is chosen most often but always as a weak second choice; expert 0 carries the
    most output. Usage pruning (routed weight) keeps 0; MC-SMoE's frequency (slots) ranks 1 first."""
    from moejax.analyze.stats import RoutingTally

    tally = RoutingTally(["a"], [3], np.array([0, 8]))
    gates = np.array([[0.9, 0.1, 0.0], [0.9, 0.1, 0.0], [0.0, 0.6, 0.4]])
    tally.add([0, 0, 0], [0, 0, 0], [1, 2, 3], [0, 1, 9], [(gates, gates)])
    np.testing.assert_allclose(common.routed_weight(tally)[0], [1.8, 0.8, 0.4])
    np.testing.assert_array_equal(common.usage(tally)[0], [2, 3, 1])
    assert prune.by_usage(common.routed_weight(tally), [1]) == [[0]]
    assert prune.by_usage(common.usage(tally), [1]) == [[1]]

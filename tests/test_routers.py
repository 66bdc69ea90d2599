"""Each router's defining property, and the router losses on hand-built statistics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.config import ConfigError, MoEConfig, from_dict
from moejax.model import Transformer, dispatch, routing


def cfg_of(**kw):
    return MoEConfig(**{"num_experts": 8, "top_k": 2, **kw})


def logits(t=64, e=8, seed=0, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(t, e)) * scale, jnp.float32)


def dense_gates(r, t, e):
    return np.asarray(jnp.zeros((t, e)).at[r.token, r.expert].add(r.weight))


def test_every_router_is_registered_with_a_paper():
    for name in ["topk", "switch", "gshard", "noisy_topk", "expert_choice", "hash", "deepseek"]:
        fn = routing.ROUTERS.get(name)
        assert "arXiv" in fn.__doc__ or "Shazeer" in fn.__doc__, name


def test_switch_sends_each_token_to_its_argmax_with_its_probability():
    lg = logits()
    r = routing.ROUTERS.get("switch")(lg, cfg_of(top_k=1, router="switch"), routing.RouteContext())
    p = np.asarray(jax.nn.softmax(lg))
    np.testing.assert_array_equal(r.expert, p.argmax(1))
    np.testing.assert_allclose(r.weight, p.max(1), rtol=1e-6)


def test_switch_and_gshard_refuse_another_k():
    with pytest.raises(ConfigError, match="top_k = 1"):
        from_dict({"model": {"moe": {"router": "switch", "top_k": 2}}})
    with pytest.raises(ConfigError, match="top_k = 2"):
        from_dict({"model": {"moe": {"router": "gshard", "top_k": 1}}})


def test_gshard_dispatches_second_expert_with_probability_twice_its_gate():
    lg = logits(t=20000, seed=1)
    cfg = cfg_of(router="gshard")
    fn = routing.ROUTERS.get("gshard")
    r_eval = fn(lg, cfg, routing.RouteContext())
    t = lg.shape[0]
    g2 = np.asarray(r_eval.weight[t:])  # renormalised second gate, every second choice kept
    assert np.all(g2 > 0) and np.all(g2 <= 0.5)
    r = fn(lg, cfg, routing.RouteContext(rng=jax.random.PRNGKey(0)))
    kept = np.asarray(r.weight[t:]) > 0
    assert kept.mean() == pytest.approx(np.minimum(1.0, 2 * g2).mean(), abs=0.015)
    np.testing.assert_allclose(r.weight[:t], r_eval.weight[:t])  # first choices always dispatched
    np.testing.assert_allclose(np.asarray(r.weight[t:])[kept], g2[kept])


def test_undispatched_assignments_take_no_capacity_slot():
    # Two tokens, both want expert 0 first; token 0's copy has weight 0 and must not take the slot.
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4)), jnp.float32)
    rng = np.random.default_rng(1)
    experts = dispatch.ExpertWeights(*(jnp.asarray(rng.normal(size=s), jnp.float32)
                                       for s in [(2, 4, 3), (2, 4, 3), (2, 3, 4)]))
    r = routing.Routing(jnp.array([0, 1], jnp.int32), jnp.array([0, 0], jnp.int32),
                        jnp.array([0.0, 1.0]), jnp.zeros((2, 2)), jnp.zeros((2, 2)))
    cfg = cfg_of(num_experts=2, top_k=1, capacity_factor=0.5)  # capacity: 1 slot per expert
    y, dropped = dispatch.capacity_dispatch(x, experts, r, cfg)
    want, _ = dispatch.dense_dispatch(x, experts, r, cfg)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    assert int(dropped) == 0


def test_noisy_topk_without_noise_is_softmax_over_the_kept_logits():
    lg = logits(seed=2)
    cfg = cfg_of(router="noisy_topk")
    r = routing.ROUTERS.get("noisy_topk")(lg, cfg, routing.RouteContext(noise_logits=jnp.zeros_like(lg)))
    top, idx = jax.lax.top_k(lg, 2)
    np.testing.assert_array_equal(r.expert, np.asarray(idx).T.reshape(-1))
    np.testing.assert_allclose(r.weight, np.asarray(jax.nn.softmax(top)).T.reshape(-1), rtol=1e-6)


def test_noisy_topk_soft_load_is_the_probability_of_being_chosen():
    # soft_load[t, e] = P(e chosen | the other experts' noise); its mean over noise draws is the
    # unconditional probability, which a Monte Carlo count of the actual choices estimates.
    t, e = 4, 6
    lg = logits(t=t, e=e, seed=3, scale=0.5)
    noise = jnp.zeros_like(lg)  # softplus(0) = 0.69: noise comparable to the logit gaps
    cfg = cfg_of(num_experts=e, router="noisy_topk")
    fn = jax.jit(lambda key: routing.ROUTERS.get("noisy_topk")(
        lg, cfg, routing.RouteContext(rng=key, noise_logits=noise)))
    chosen, soft = np.zeros((t, e)), np.zeros((t, e))
    draws = 3000
    for key in jax.random.split(jax.random.PRNGKey(0), draws):
        r = fn(key)
        chosen[np.asarray(r.token), np.asarray(r.expert)] += 1
        soft += np.asarray(r.soft_load)
    np.testing.assert_allclose(soft / draws, chosen / draws, atol=0.03)


def test_expert_choice_fills_every_expert_exactly():
    lg = logits(t=50, seed=4)
    cfg = cfg_of(router="expert_choice", capacity_factor=1.0)
    r = routing.ROUTERS.get("expert_choice")(lg, cfg, routing.RouteContext())
    c = int(np.ceil(50 * 2 / 8))
    np.testing.assert_array_equal(np.bincount(np.asarray(r.expert), minlength=8), [c] * 8)
    p = np.asarray(jax.nn.softmax(lg))
    for e in range(8):  # each expert took its c most probable tokens
        took = np.sort(np.asarray(r.token)[np.asarray(r.expert) == e])
        np.testing.assert_array_equal(took, np.sort(np.argsort(-p[:, e])[:c]))


def test_hash_routing_is_a_fixed_function_of_the_token_id():
    ids = jnp.asarray(np.random.default_rng(5).integers(0, 1000, size=64), jnp.int32)
    cfg = cfg_of(router="hash")
    fn = routing.ROUTERS.get("hash")
    a = fn(logits(seed=6), cfg, routing.RouteContext(token_ids=ids))
    b = fn(logits(seed=7, scale=10), cfg, routing.RouteContext(token_ids=ids))
    np.testing.assert_array_equal(a.expert, b.expert)  # the logits do not matter
    first = dict(zip(np.asarray(ids).tolist(), np.asarray(a.expert[:64]).tolist()))
    for i, e in zip(np.asarray(ids).tolist(), np.asarray(a.expert[:64]).tolist()):
        assert first[i] == e  # equal ids, equal experts
    vocab = routing.hash_experts(jnp.arange(4096), 8, 1)[:, 0]
    counts = np.bincount(np.asarray(vocab), minlength=8)
    assert counts.min() > 0.8 * 4096 / 8  # roughly balanced over the vocabulary


def test_deepseek_bias_changes_the_choice_not_the_weights():
    lg = logits(seed=8)
    cfg = cfg_of(router="deepseek", renormalize=False)
    fn = routing.ROUTERS.get("deepseek")
    base = fn(lg, cfg, routing.RouteContext(bias=jnp.zeros(8)))
    bias = jnp.zeros(8).at[3].set(10.0)  # expert 3 is now always selected
    r = fn(lg, cfg, routing.RouteContext(bias=bias))
    assert set(np.asarray(r.expert[:64]).tolist()) == {3}
    assert not np.array_equal(r.expert, base.expert)
    s = np.asarray(jax.nn.sigmoid(lg))
    # the weights are the plain sigmoid scores of the chosen experts, bias not included
    np.testing.assert_allclose(r.weight, s[np.asarray(r.token), np.asarray(r.expert)], rtol=1e-6)


def test_deepseek_group_limited_routing_stays_inside_the_best_groups():
    lg = logits(t=32, e=8, seed=9)
    cfg = cfg_of(router="deepseek", top_k=2, n_group=4, topk_group=1)
    r = routing.ROUTERS.get("deepseek")(lg, cfg, routing.RouteContext(bias=jnp.zeros(8)))
    s = np.asarray(jax.nn.sigmoid(lg)).reshape(32, 4, 2)
    best_group = np.sort(s, axis=-1)[:, :, -2:].sum(-1).argmax(1)
    groups = np.asarray(r.expert).reshape(2, 32).T // 2
    np.testing.assert_array_equal(groups, np.stack([best_group] * 2, 1))


def test_deepseek_bias_update_moves_load_toward_balance():
    lg = logits(t=512, seed=10) + jnp.linspace(0, 2, 8)  # later experts favoured
    cfg = cfg_of(router="deepseek")
    fn = jax.jit(lambda b: routing.ROUTERS.get("deepseek")(lg, cfg, routing.RouteContext(bias=b)))
    bias = jnp.zeros(8)

    def cv(b):
        counts = np.bincount(np.asarray(fn(b).expert), minlength=8)
        return counts.std() / counts.mean(), counts

    cv0, counts0 = cv(bias)
    for _ in range(200):
        counts = jnp.asarray(cv(bias)[1], jnp.float32)
        bias = routing.bias_update(bias, counts, 0.01)
    cv1, _ = cv(bias)
    assert cv0 > 0.5 and cv1 < 0.25 * cv0, (cv0, cv1)


def test_every_router_runs_in_the_moe_block_and_dispatchers_agree():
    from moejax.model.moe import RouterInputs, routed_experts
    rng = np.random.default_rng(0)
    t, d, e, f = 16, 8, 4, 8
    x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
    w = [jnp.asarray(rng.normal(size=s) * 0.5, jnp.float32) for s in [(d, e), (d, e)]]
    experts = dispatch.ExpertWeights(*(jnp.asarray(rng.normal(size=s), jnp.float32)
                                       for s in [(e, d, f), (e, d, f), (e, f, d)]))
    ids = jnp.asarray(rng.integers(0, 64, t), jnp.int32)
    for name, k in [("topk", 2), ("switch", 1), ("gshard", 2), ("noisy_topk", 2),
                    ("expert_choice", 2), ("hash", 2), ("deepseek", 2)]:
        def both(key, name=name, k=k):
            ys = []
            for disp in ["dense", "dropless"]:
                cfg = cfg_of(num_experts=e, top_k=k, router=name, dispatch=disp, tile_size=8)
                router = RouterInputs(w[0], jnp.zeros(e), w[1])
                ys.append(routed_experts(x, router, experts, jnp.ones(t, bool), ids, cfg, rng=key,
                                         seq_len=8)[0])
            return ys
        dense, dropless = jax.jit(both)(jax.random.PRNGKey(1))
        assert np.isfinite(np.asarray(dense)).all() and float(jnp.abs(dense).sum()) > 0, name
        np.testing.assert_allclose(dense, dropless, rtol=1e-4, atol=1e-5, err_msg=name)


def test_routed_scaling_factor_scales_the_routed_output():
    from moejax.model.moe import RouterInputs, routed_experts
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)
    experts = dispatch.ExpertWeights(*(jnp.asarray(rng.normal(size=s), jnp.float32)
                                       for s in [(4, 6, 5), (4, 6, 5), (4, 5, 6)]))
    router = RouterInputs(jnp.asarray(rng.normal(size=(6, 4)), jnp.float32), jnp.zeros(4))
    ys = [routed_experts(x, router, experts, jnp.ones(8, bool), jnp.zeros(8, jnp.int32),
                         cfg_of(num_experts=4, dispatch="dense", routed_scaling_factor=f))[0]
          for f in (1.0, 2.5)]
    np.testing.assert_allclose(ys[1], 2.5 * ys[0], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Losses on hand-built statistics.


def stats(counts, prob_sum, tokens, **kw):
    e = len(counts)
    z = jnp.zeros(e)
    base = dict(counts=jnp.asarray(counts, jnp.float32), prob_sum=jnp.asarray(prob_sum, jnp.float32),
                tokens=jnp.asarray(tokens, jnp.float32), z_sum=jnp.zeros(()), gate_sum=z,
                soft_load_sum=z, seq_balance_sum=jnp.zeros(()), seqs=jnp.ones(()))
    base.update({k: jnp.asarray(v, jnp.float32) for k, v in kw.items()})
    return routing.RouterStats(**base)


def test_device_loss_is_one_when_devices_balance_and_switch_loss_with_one_expert_per_group():
    # Experts unbalanced inside each device but devices balanced: device loss 1, Switch loss > 1.
    s = stats([3, 1, 3, 1], [0.3 * 8, 0.2 * 8, 0.3 * 8, 0.2 * 8], 8)
    assert float(routing.device_balance_loss(s, 2)) == pytest.approx(1.0, rel=1e-6)
    assert float(routing.load_balancing_loss(s)) > 1.0
    assert float(routing.device_balance_loss(s, 4)) == pytest.approx(float(routing.load_balancing_loss(s)))


def test_importance_and_load_losses_are_cv_squared():
    s = stats([1, 1, 1, 1], [1, 1, 1, 1], 4, gate_sum=[1, 1, 1, 1], soft_load_sum=[1.0, 3.0, 1.0, 3.0])
    assert float(routing.importance_loss(s)) == pytest.approx(0.0, abs=1e-7)
    assert float(routing.load_loss(s)) == pytest.approx(0.25, rel=1e-6)  # std 1, mean 2


def test_sequence_loss_sees_imbalance_inside_sequences_that_the_batch_hides():
    # Two sequences of 4 tokens, k=1: sequence 0 all to expert 0, sequence 1 all to expert 1, with
    # matching probabilities. Over the batch the load is balanced; inside each sequence it is not.
    probs = np.array([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 4)
    r = routing.Routing(jnp.arange(8, dtype=jnp.int32), jnp.asarray([0] * 4 + [1] * 4, jnp.int32),
                        jnp.ones(8), jnp.asarray(probs, jnp.float32), jnp.zeros((8, 2)))
    s = routing.router_stats(r, seq_len=4)
    assert float(routing.load_balancing_loss(s)) == pytest.approx(1.0)
    assert float(routing.sequence_balance_loss(s)) == pytest.approx(2.0)  # = E: fully collapsed


def test_pyramid_layers_shared_gate_and_routing_outputs_in_the_model():
    cfg = from_dict({"model": {"vocab_size": 32, "d_model": 16, "n_layers": 3, "n_heads": 2,
                               "n_kv_heads": 1, "d_ff": 32,
                               "moe": {"num_experts": 4, "top_k": 1, "d_expert": 8, "first_dense": 1,
                                       "layer_experts": [2, 4], "num_shared_experts": 1,
                                       "shared_gate": True}}})
    model = Transformer(cfg.model, rngs=nnx.Rngs(0))
    assert model.blocks[1].ffn.w_gate.shape[0] == 2 and model.blocks[2].ffn.w_gate.shape[0] == 4
    assert model.blocks[2].ffn.shared_gate.shape == (16, 1)
    graphdef, state = nnx.split(model)
    toks = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 8)), jnp.int32)
    _, aux = jax.jit(lambda s: nnx.merge(graphdef, s)(toks, return_routing=True))(state)
    load = np.asarray(aux["expert_load"])
    assert load.shape == (2, 4) and np.all(load[0, 2:] == 0)  # the 2-expert layer, padded
    np.testing.assert_allclose(load.sum(1), 16)  # 16 tokens, top-1
    probs, gates = aux["routing"][0]["probs"], aux["routing"][0]["gates"]
    assert probs.shape == gates.shape == (2, 8, 2)
    np.testing.assert_array_equal((np.asarray(gates) > 0).sum(-1), 1)
    with pytest.raises(ConfigError, match="layer_experts has 3 entries but the model has 2"):
        from_dict({"model": {"n_layers": 3, "moe": {"first_dense": 1, "layer_experts": [2, 4, 8]}}})


def test_train_step_moves_the_deepseek_bias_toward_balance_without_gradients():
    from moejax import config as config_lib
    from moejax.optim import make_optimizer
    from moejax.runs import build_model
    from moejax.train import init_state, make_train_step
    cfg = config_lib.load(None, ["model.vocab_size=32", "model.d_model=16", "model.n_layers=1",
                                 "model.n_heads=2", "model.n_kv_heads=1", "model.moe.num_experts=4",
                                 "model.moe.top_k=1", "model.moe.d_expert=8", "model.moe.router=deepseek",
                                 "model.moe.bias_update_rate=0.1", "train.lr=0", "train.batch_size=2"])
    graphdef, params = nnx.split(build_model(cfg))
    opt = make_optimizer(cfg.train)
    step = jax.jit(make_train_step(graphdef, opt, cfg))
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 32, (2, 16)).astype(np.int32)
    batch = {"tokens": toks, "targets": toks, "loss_mask": np.ones((2, 16), np.float32),
             "segment_ids": np.ones((2, 16), np.int32),
             "positions": np.tile(np.arange(16, dtype=np.int32), (2, 1))}
    state, metrics = step(init_state(params, opt), batch)
    load = np.asarray(metrics["expert_load"])[0] * 32
    bias = np.asarray(state["params"]["blocks"][0]["ffn"]["router_bias"][...])
    np.testing.assert_allclose(bias, 0.1 * np.sign(load.mean() - load))
    assert np.any(bias != 0)

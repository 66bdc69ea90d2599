"""Optimizer: warm-up + cosine schedule end points, weight decay only on matrices."""
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moejax import config
from moejax.optim import decay_mask, make_optimizer, schedule


def test_schedule_warms_up_then_decays_to_the_floor():
    tc = config.load(None, ["train.steps=100", "train.warmup_steps=10", "train.lr=1e-3",
                            "train.min_lr_ratio=0.1"]).train
    s = schedule(tc)
    assert float(s(0)) == 0.0
    assert float(s(5)) == pytest.approx(5e-4)
    assert float(s(10)) == pytest.approx(1e-3)
    assert float(s(100)) == pytest.approx(1e-4, rel=1e-4)
    assert float(s(55)) == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-3)  # cosine midpoint


def test_weight_decay_skips_norm_scales():
    params = {"w": jnp.ones((2, 3)), "scale": jnp.ones((3,))}
    assert decay_mask(params) == {"w": True, "scale": False}
    tc = config.load(None, ["train.lr=0.1", "train.warmup_steps=0", "train.weight_decay=0.5",
                            "train.grad_clip=0", "train.steps=10"]).train
    opt = make_optimizer(tc)
    zero = {k: jnp.zeros_like(v) for k, v in params.items()}
    updates, _ = opt.update(zero, opt.init(params), params)
    new = optax.apply_updates(params, updates)
    assert float(new["scale"][0]) == 1.0                      # no gradient, no decay
    assert float(new["w"][0, 0]) < 1.0                        # decayed
    np.testing.assert_allclose(new["w"], 1.0 - 0.1 * 0.5 * 1.0, rtol=1e-6)  # lr at step 0 with no warm-up


def _tiny_params():
    from flax import nnx
    from moejax.runs import build_model
    cfg = config.load(None, ["model.vocab_size=32", "model.d_model=16", "model.n_layers=2",
                             "model.n_heads=2", "model.n_kv_heads=1", "model.d_ff=16",
                             "model.moe.num_experts=2", "model.moe.top_k=1", "model.moe.d_expert=8",
                             "model.moe.first_dense=1", "model.moe.num_shared_experts=1"])
    return nnx.split(build_model(cfg))[1]


def _step(params, *overrides):
    import jax
    tc = config.load(None, ["train.lr=0.1", "train.warmup_steps=0", "train.steps=10",
                            *overrides]).train
    opt = make_optimizer(tc)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = opt.update(grads, opt.init(params), params)
    return {g: _changed(params, optax.apply_updates(params, updates), g) for g in PARAM_GROUPS}


def _changed(old, new, group):
    import jax
    from moejax.optim import param_labels
    labels = jax.tree.leaves(param_labels(old))
    pairs = [(o, n) for o, n, l in zip(jax.tree.leaves(old), jax.tree.leaves(new), labels) if l == group]
    assert pairs, group
    return [bool(jnp.any(o != n)) for o, n in pairs]


from moejax.optim import PARAM_GROUPS  # noqa: E402


def test_freezing_groups_leaves_exactly_them_untouched():
    params = _tiny_params()
    moved = _step(params, "train.freeze=[experts, router]")
    for g, flags in moved.items():
        assert all(not f for f in flags) if g in ("experts", "router") else all(flags), g
    moved = _step(params, "train.train_only=[experts]")
    for g, flags in moved.items():
        assert all(flags) if g == "experts" else all(not f for f in flags), g


def test_lr_multipliers_scale_each_groups_update():
    import jax
    from moejax.optim import param_labels
    params = _tiny_params()
    tc = config.load(None, ["train.lr=0.1", "train.warmup_steps=0", "train.steps=10",
                            "train.weight_decay=0", "train.lr_multipliers=[router=0.5, experts=2]"]).train
    opt = make_optimizer(tc)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = opt.update(grads, opt.init(params), params)
    # Adam's first step moves every parameter by lr * sign(grad) (up to epsilon).
    for u, label in zip(jax.tree.leaves(updates), jax.tree.leaves(param_labels(params))):
        want = {"router": 0.05, "experts": 0.2, "router_bias": 0.0}.get(label, 0.1)
        np.testing.assert_allclose(np.abs(np.asarray(u)), want, rtol=1e-4, err_msg=label)


def test_bad_group_names_are_one_clear_error():
    with pytest.raises(config.ConfigError, match="unknown parameter group 'expert'.*allowed: embed"):
        config.load(None, ["train.freeze=[expert]"])
    with pytest.raises(config.ConfigError, match="GROUP=FACTOR"):
        config.load(None, ["train.lr_multipliers=[router:2]"])

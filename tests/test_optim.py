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

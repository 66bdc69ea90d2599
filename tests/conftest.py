import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from moejax import config  # noqa: E402

TINY = [
    "model.vocab_size=64", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
    "model.n_kv_heads=2", "model.d_ff=64", "model.moe.num_experts=4", "model.moe.top_k=2",
    "model.moe.d_expert=16", "model.moe.tile_size=8",
]


def tiny_config(*overrides: str) -> config.Config:
    """A model small enough to compile and run in well under a second."""
    return config.load(None, TINY + list(overrides))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def numpy_state(module: nnx.Module) -> dict:
    return jax.tree.map(np.asarray, nnx.state(module, nnx.Param).to_pure_dict())


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a longer test (still runs in CI)")

"""Training with each grouped expert FFN gives the losses of the tiled form (issue 15's done-when
for model.moe.gmm: megablox): 3 AdamW steps on packed sequences with GQA, tiny shapes, on CPU
(megablox in Pallas interpret mode)."""
import jax
import numpy as np
import pytest

from moejax.optim import make_optimizer
from moejax import parallel
from moejax.train import create_sharded_state, make_train_step
from tests.conftest import tiny_config

B, T = 2, 16


def packed_batch(step: int, vocab: int) -> dict[str, np.ndarray]:
    """Two packed segments per row (lengths 7 + 9 and 10 + 6), positions restarting in each."""
    rng = np.random.default_rng(step)
    tokens = rng.integers(1, vocab, (B, T + 1)).astype(np.int32)
    seg = np.array([[1] * 7 + [2] * 9, [1] * 10 + [2] * 6], np.int32)
    pos = np.array([list(range(7)) + list(range(9)), list(range(10)) + list(range(6))], np.int32)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:].copy(), "segment_ids": seg,
            "positions": pos, "loss_mask": np.ones((B, T), np.float32)}


def three_step_losses(gmm: str) -> list[float]:
    cfg = tiny_config("model.n_layers=1", f"model.moe.gmm={gmm}", "model.moe.gmm_tiling=[8,128,128]", "model.moe.dispatch=dropless",
                      "train.lr=0.01", "train.warmup_steps=0", f"train.batch_size={B}", f"data.seq_len={T}")
    assert cfg.model.n_kv_heads < cfg.model.n_heads  # GQA
    optimizer = make_optimizer(cfg.train)
    graphdef, state = create_sharded_state(cfg, parallel.make_mesh(cfg), optimizer)
    step = jax.jit(make_train_step(graphdef, optimizer, cfg))
    losses = []
    for i in range(3):
        state, metrics = step(state, packed_batch(i, cfg.model.vocab_size))
        losses.append(float(metrics["loss"]))
    return losses


@pytest.fixture(scope="module")
def tiled_losses():
    return three_step_losses("tiled")


@pytest.mark.slow
def test_megablox_trains_the_losses_of_tiled(tiled_losses):
    # ragged_dot and tiled_static are checked against the reference in tests/test_dispatch.py.
    losses = three_step_losses("megablox")
    assert len(set(tiled_losses)) == 3  # the steps do move the loss
    np.testing.assert_allclose(losses, tiled_losses, rtol=1e-4)

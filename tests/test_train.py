"""The training loop: losses, steps, resume equality, SIGTERM, NaN stop, CLI errors, generation."""
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import config
from moejax.decode import generate
from moejax.errors import UserError
from moejax.metrics import read_metrics
from moejax.model import Transformer
from moejax.optim import make_optimizer
from moejax.losses import chunk_positions, fused_head_applies, head_loss_sum
from moejax.train import init_state, lm_loss_sum, make_train_step, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_RUN = [
    "model.vocab_size=320", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
    "model.n_kv_heads=2", "model.d_ff=64", "model.moe.num_experts=4", "model.moe.top_k=2",
    "model.moe.d_expert=32", "model.moe.tile_size=32",
    "data.source=tfds:moejax_tasks/tiny", "data.seq_len=64", "data.eval_questions=2",
    "train.batch_size=4", "train.lr=3e-3", "train.warmup_steps=2", "train.log_every=1",
]


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def run_cfg(tfds_dir, workdir, *extra):
    return config.load(None, TINY_RUN + [f"data.tfds_dir={tfds_dir}", f"train.workdir={workdir}",
                                         *extra])


def cli(*args, env_extra=None, **kw):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def cli_args(tfds_dir, workdir, *extra):
    sets = TINY_RUN + [f"data.tfds_dir={tfds_dir}", f"train.workdir={workdir}", *extra]
    return ["moejax.train", "--config", "configs/quickstart.yaml"] + [a for s in sets for a in ("--set", s)]


# ----------------------------------------------------------------------------------------- units


def test_lm_loss_counts_only_masked_targets():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(1, 4, 5)), jnp.float32)
    targets = jnp.array([[1, 2, 3, 4]])
    mask = jnp.array([[0.0, 1.0, 0.0, 1.0]])
    lp = np.asarray(jax.nn.log_softmax(logits))
    assert float(lm_loss_sum(logits, targets, mask)) == pytest.approx(-(lp[0, 1, 2] + lp[0, 3, 4]), rel=1e-6)
    g = jax.grad(lambda l: lm_loss_sum(l, targets, mask))(logits)
    assert float(jnp.abs(g[0, 0]).sum()) == 0 and float(jnp.abs(g[0, 2]).sum()) == 0


@pytest.mark.parametrize("b,t", [(2, 256), (3, 60), (1, 7)])
def test_lm_loss_value_and_gradient_match_numpy_in_every_chunking(b, t):
    """(2, 256) runs the chunked loops (4 chunks of 64 positions), (3, 60) chunks of 4, (1, 7) one
    pass; value and gradient against numpy's log-softmax and (softmax - onehot) * mask."""
    rng = np.random.default_rng(1)
    v = 50
    logits = rng.normal(size=(b, t, v)).astype(np.float32) * 3
    targets = rng.integers(0, v, (b, t)).astype(np.int32)
    mask = rng.integers(0, 2, (b, t)).astype(np.float32)
    x = logits.astype(np.float64)
    lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) + x.max(-1, keepdims=True)
    logp = x - lse
    want = -(np.take_along_axis(logp, targets[..., None], -1)[..., 0] * mask).sum()
    want_grad = (np.exp(logp) - np.eye(v)[targets]) * mask[..., None]
    got, got_grad = jax.value_and_grad(lm_loss_sum)(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    assert float(got) == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(np.asarray(got_grad), want_grad, atol=1e-5)


@pytest.mark.parametrize("b,t,v", [(2, 256, 50), (3, 60, 50), (1, 7, 50), (2, 64, 40000)])
@pytest.mark.parametrize("fused", [True, False])
def test_head_loss_value_and_gradients_match_numpy(b, t, v, fused):
    """The fused head + loss (and its unfused form) against numpy: value, dx = dlogits @ W^T and
    dW = x^T dlogits with dlogits = (softmax - onehot) * mask. v = 50 fits each sequence in one
    chunk; v = 40,000 allows 13 positions of 2 rows (4 MiB of logits), so (2, 64) runs 8 chunks of
    8 positions (chunk_positions: the largest divisor of T that fits)."""
    assert chunk_positions(256, 2, 50) == 256 and chunk_positions(64, 2, 40000) == 8
    assert chunk_positions(256, 8, 4096) == 32 and chunk_positions(60, 3, 40000) == 6
    rng = np.random.default_rng(2)
    d = 8
    x = rng.normal(size=(b, t, d)).astype(np.float32)
    w = (rng.normal(size=(d, v)) * 0.5).astype(np.float32)
    targets = rng.integers(0, v, (b, t)).astype(np.int32)
    mask = rng.integers(0, 2, (b, t)).astype(np.float32)
    logits = x.astype(np.float64) @ w.astype(np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) + logits.max(-1, keepdims=True)
    logp = logits - lse
    want = -(np.take_along_axis(logp, targets[..., None], -1)[..., 0] * mask).sum()
    dlogits = (np.exp(logp) - np.eye(v)[targets]) * mask[..., None]
    loss = lambda x, w: head_loss_sum(x, w, jnp.asarray(targets), jnp.asarray(mask), fused=fused)  # noqa: E731
    got, (dx, dw) = jax.value_and_grad(loss, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w))
    assert float(got) == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(np.asarray(dx), dlogits @ w.T.astype(np.float64), atol=2e-5)
    np.testing.assert_allclose(np.asarray(dw), np.einsum("btd,btv->dv", x, dlogits), atol=2e-5)


def test_fused_head_applies_on_cpu_to_small_unsplit_heads():
    assert fused_head_applies(jnp.zeros((256, 4096), jnp.float32), vocab_split=False)  # the peer shapes
    assert not fused_head_applies(jnp.zeros((256, 4096), jnp.float32), vocab_split=True)
    assert not fused_head_applies(jnp.zeros((4096, 32000), jnp.bfloat16), vocab_split=False)


def synthetic_batch(b=4, t=16, vocab=64, seed=0):
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, vocab, (b, t)).astype(np.int32)
    return {"tokens": jnp.asarray(toks), "targets": jnp.asarray(np.roll(toks, -1, 1)),
            "loss_mask": jnp.asarray(rng.integers(0, 2, (b, t)).astype(np.float32)),
            "segment_ids": jnp.ones((b, t), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))}


def test_gradient_accumulation_equals_full_batch():
    from tests.conftest import tiny_config
    results = []
    for accum in (1, 2):
        cfg = tiny_config(f"train.grad_accum={accum}", "model.moe.aux_loss_coef=0",
                          "model.moe.z_loss_coef=0")
        graphdef, params = nnx.split(Transformer(cfg.model, rngs=nnx.Rngs(0)))
        opt = make_optimizer(cfg.train)
        step = jax.jit(make_train_step(graphdef, opt, cfg))
        state, metrics = step(init_state(params, opt), synthetic_batch())
        results.append((state["params"], metrics["loss"]))
    assert float(results[0][1]) == pytest.approx(float(results[1][1]), rel=1e-5)
    for a, b in zip(jax.tree.leaves(results[0][0]), jax.tree.leaves(results[1][0])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_train_step_compiles_once_and_counts_steps():
    from tests.conftest import tiny_config
    cfg = tiny_config()
    graphdef, params = nnx.split(Transformer(cfg.model, rngs=nnx.Rngs(0)))
    opt = make_optimizer(cfg.train)
    step = jax.jit(make_train_step(graphdef, opt, cfg), donate_argnums=0)
    state = init_state(params, opt)
    for seed in range(3):
        state, metrics = step(state, synthetic_batch(seed=seed))
    assert int(state["step"]) == 3 and step._cache_size() == 1
    np.testing.assert_allclose(metrics["expert_load"].sum(-1), 1.0, rtol=1e-5)


def test_greedy_generation_matches_a_step_by_step_loop():
    from tests.conftest import tiny_config
    model = Transformer(tiny_config().model, rngs=nnx.Rngs(0))
    prompts = [[1, 5, 9], [2, 7, 3, 3, 8]]
    got = generate(model, prompts, max_new=5, stop_ids=[63])
    for prompt, out in zip(prompts, got):
        seq = list(prompt)
        for _ in range(5):
            logits, _ = model(jnp.asarray([seq]))
            seq.append(int(jnp.argmax(logits[0, -1])))
            if seq[-1] == 63:
                break
        assert out == seq[len(prompt):]


# ----------------------------------------------------------------------------------------- runs


def test_short_run_writes_the_run_directory_and_learns(tfds_dir, tmp_path):
    workdir = str(tmp_path / "run")
    final = train(run_cfg(tfds_dir, workdir, "train.steps=30", "train.eval_every=30",
                          "train.save_every=15"))
    for name in ("config.yaml", "metrics.jsonl", "tokenizer.model", "checkpoints", "tensorboard"):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert config.load(os.path.join(workdir, "config.yaml")).train.steps == 30
    rows = [r for r in read_metrics(workdir) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 31))
    for key in ("aux_loss", "z_loss", "lr", "grad_norm", "dropped_fraction", "expert_load"):
        assert key in rows[-1], key
    assert "tokens_per_sec" in rows[-1] and "mfu" in rows[-1]
    assert np.asarray(rows[-1]["expert_load"]).shape == (2, 4)
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"]  # 5.75 (ln 320) -> ~4.1 measured
    assert "eval_loss" in final and "eval_exact_match/arithmetic" in final
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["15", "30"]
    assert any(f.startswith("events") for f in os.listdir(os.path.join(workdir, "tensorboard")))


def losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def test_sigterm_saves_and_resume_gives_the_same_losses(tfds_dir, tmp_path):
    # Enough tiny steps that SIGTERM, sent once 3 steps are logged, always lands mid-run.
    n = 400
    steps = [f"train.steps={n}", "train.save_every=1000", "train.eval_every=1000",
             "train.warmup_steps=2"]
    straight = str(tmp_path / "straight")
    train(run_cfg(tfds_dir, straight, *steps))

    stopped = str(tmp_path / "stopped")
    proc = cli(*cli_args(tfds_dir, stopped, *steps, "train.log_every=1"))
    deadline = time.time() + 480
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(os.path.join(stopped, "metrics.jsonl")) and len(losses(stopped)) >= 3:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    out, err = proc.communicate(timeout=480)
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM received: saved a checkpoint" in out
    first = losses(stopped)
    assert 3 <= len(first) < n, "the signal arrived too late to test resuming"
    saved = sorted(int(s) for s in os.listdir(os.path.join(stopped, "checkpoints")))
    assert saved == [max(first)]

    train(run_cfg(tfds_dir, stopped, *steps))  # the same command again resumes
    resumed, want = losses(stopped), losses(straight)
    assert sorted(resumed) == list(range(1, n + 1))
    for step in range(1, n + 1):
        assert resumed[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step


def test_nonfinite_loss_stops_with_the_step(tfds_dir, tmp_path):
    cfg = run_cfg(tfds_dir, str(tmp_path / "nan"), "train.steps=6", "train.lr=1e30",
                  "train.grad_clip=0", "train.warmup_steps=0", "train.save_every=3")
    with pytest.raises(UserError, match=r"NaN/inf at step \d+") as e:
        train(cfg)
    bad = int(re.search(r"at step (\d+)", str(e.value)).group(1))
    row = next(r for r in read_metrics(str(tmp_path / "nan")) if r.get("step") == bad and "loss" in r)
    assert not (np.isfinite(float(row["loss"])) and np.isfinite(float(row["grad_norm"])))
    # Only states from before the bad step were checkpointed.
    ckpts = os.path.join(str(tmp_path / "nan"), "checkpoints")
    assert all(int(s) < bad for s in os.listdir(ckpts) if s.isdigit())


def test_skip_nonfinite_keeps_training(tfds_dir, tmp_path):
    cfg = run_cfg(tfds_dir, str(tmp_path / "skip"), "train.steps=4", "train.lr=1e30",
                  "train.grad_clip=0", "train.warmup_steps=0", "train.skip_nonfinite=true",
                  "train.eval_every=100", "train.save_every=100")
    train(cfg)
    rows = [r for r in read_metrics(str(tmp_path / "skip")) if "loss" in r]
    assert sum(r["skipped"] for r in rows) >= 1


def test_cli_user_errors_are_one_line(tmp_path):
    cases = [
        (["moejax.train", "--config", "configs/quickstart.yaml", "--set", "model.moe.num_expert=4"],
         "model.moe.num_experts"),
        (["moejax.train", "--config", str(tmp_path / "missing.yaml")], "missing.yaml"),
        (["moejax.train", "--config", "configs/quickstart.yaml", "--set", f"train.workdir={tmp_path}/w",
          "--set", f"data.source=jsonl:{tmp_path}/nope.jsonl"], "nope.jsonl"),
        (["moejax.generate", "--workdir", str(tmp_path), "--prompt", "hi"], "run directory"),
    ]
    for args, needle in cases:
        proc = cli(*args)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (args, err)
        lines = [l for l in err.splitlines() if l.strip() and not l.startswith("WARNING")]
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], (args, err)
        assert "Traceback" not in err


def test_generate_cli_answers_from_a_checkpoint(tfds_dir, tmp_path):
    workdir = str(tmp_path / "gen")
    train(run_cfg(tfds_dir, workdir, "train.steps=2", "train.eval_every=100", "train.save_every=100"))
    proc = cli("moejax.generate", "--workdir", workdir, "--prompt", "What is 2 + 3?",
               "--max-new-tokens", "4")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert out.startswith("> What is 2 + 3?\n")

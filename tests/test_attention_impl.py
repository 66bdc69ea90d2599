"""model.attention_impl: every implementation trains the losses of the dense `xla` reference (Pallas
kernels in interpret mode on CPU), the registries match moejax.names, and bad choices are one line."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from moejax import names
from moejax.errors import UserError
from moejax.model import attention_impl as ai
from moejax.model.transformer import Transformer
from tests.conftest import tiny_config

# GQA (4 query heads over 2 KV heads), head_dim 128, two packed examples per row, a sliding window;
# T = 128 is the smallest sequence splash runs (its key block must be a multiple of 128).
T = 128
BASE = ["model.head_dim=128", "model.n_layers=1", f"data.seq_len={T}", "model.attention_block_q=32",
        "model.attention_block_kv=32"]


def packed_batch(b: int = 1, seed: int = 0):
    rng = np.random.default_rng(seed)
    cut = 77
    seg = np.r_[np.ones(cut), 2 * np.ones(T - cut)].astype(np.int32)[None].repeat(b, 0)
    pos = np.r_[np.arange(cut), np.arange(T - cut)].astype(np.int32)[None].repeat(b, 0)
    tokens = rng.integers(1, 64, (b, T + 1)).astype(np.int32)
    return jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:]), jnp.asarray(seg), jnp.asarray(pos)


def train_losses(impl: str, window: int | None, steps: int = 3) -> list[float]:
    extra = [f"model.attention_impl={impl}"] + ([f"model.sliding_window={window}"] if window else [])
    if impl == "splash":  # its key block must be a multiple of 128
        extra += ["model.attention_block_q=128", "model.attention_block_kv=128"]
    cfg = tiny_config(*BASE, *extra)
    model = Transformer(cfg.model, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    tokens, targets, seg, pos = packed_batch()

    @nnx.jit
    def step(model, opt):
        def loss_fn(m):
            logits, _ = m(tokens, segment_ids=seg, positions=pos)
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    return [float(step(model, opt)) for _ in range(steps)]


@pytest.fixture(scope="module")
def reference_losses():
    return {w: train_losses("xla", w) for w in (None, 24)}


@pytest.mark.slow
@pytest.mark.parametrize("impl, window", [("chunked", 24), ("splash", 24), ("pallas_gpu", None)])
def test_impl_trains_the_xla_losses(impl, window, reference_losses):
    """Three Adam steps with packing, GQA, head_dim 128 (and a window where the kernel has one)."""
    got, want = train_losses(impl, window), reference_losses[window]
    assert want[0] != want[-1]  # the steps moved the model
    np.testing.assert_allclose(got, want, rtol=1e-4)


@pytest.mark.parametrize("impl", ["chunked", "splash"])
def test_impl_forward_and_grads_match_dense_with_mla_head_dims(impl):
    """qk width 48 and v width 32 (MLA's unequal head dims; kernels get zero-padded heads)."""
    rng = np.random.default_rng(1)
    b, n, kv = 1, 4, 2
    q = jnp.asarray(rng.normal(size=(b, T, n, 48)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, T, kv, 48)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, T, kv, 32)), jnp.float32)
    _, _, seg, pos = packed_batch(b)
    blk = 128 if impl == "splash" else 32

    def f(name):
        spec = ai.AttnSpec(name, 48 ** -0.5, 16, blk, blk)
        fn = lambda q, k, v: ai.ATTENTION_IMPLS.get(name).fn(q, k, v, seg, pos, spec)
        out = fn(q, k, v)
        return out, jax.grad(lambda *a: jnp.sum(fn(*a) ** 2), argnums=(0, 1, 2))(q, k, v)

    (o, g), (o_ref, g_ref) = f(impl), f("xla")
    np.testing.assert_allclose(o, o_ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(g, g_ref):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-4)


def test_chunked_bf16_close_to_dense():
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(2, 40, 4, 16)), jnp.bfloat16)  # 40: not a multiple of the block
    k = jnp.asarray(rng.normal(size=(2, 40, 2, 16)), jnp.bfloat16)
    v = jnp.asarray(rng.normal(size=(2, 40, 2, 16)), jnp.bfloat16)
    seg = jnp.ones((2, 40), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(40), (2, 40))
    spec = ai.AttnSpec("chunked", 0.25, None, 16, 16)
    got = ai.ATTENTION_IMPLS.get("chunked").fn(q, k, v, seg, pos, spec)
    want = ai.ATTENTION_IMPLS.get("xla").fn(q, k, v, seg, pos, spec._replace(impl="xla"))
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=2e-2)


def test_auto_picks_from_the_registry():
    spec = ai.AttnSpec("auto", 1.0, None, 512, 512)
    assert ai.pick_auto("tpu", jnp.bfloat16, 4096, spec, 128, 128) == "splash"
    assert ai.pick_auto("gpu", jnp.bfloat16, 4096, spec, 128, 128) == "cudnn"
    assert ai.pick_auto("gpu", jnp.float32, 4096, spec, 128, 128) == "pallas_gpu"
    assert ai.pick_auto("gpu", jnp.float32, 4096, spec._replace(window=64), 128, 128) == "chunked"
    assert ai.pick_auto("cpu", jnp.float32, ai.CPU_CHUNKED_FROM - 1, spec, 64, 64) == "xla"
    assert ai.pick_auto("cpu", jnp.float32, ai.CPU_CHUNKED_FROM, spec, 64, 64) == "chunked"
    # auto's CPU blocks: clipped to cpu_block(T), never above the configured ones
    got = ai.auto_spec("cpu", "chunked", 256, spec._replace(block_q=512, block_kv=32))
    assert (got.block_q, got.block_kv) == (ai.cpu_block(256), 32) == (64, 32)
    assert ai.auto_spec("tpu", "splash", 256, spec) == spec


@pytest.mark.parametrize("impl, seq, blocks, expected", [
    ("cudnn", 64, 64, ["model.attention_impl = 'cudnn'", "gpu", "allowed here", "chunked", "xla"]),
    ("splash", 384, 256, ["model.attention_block_q = 256 does not divide the sequence length 384"]),
    ("splash", 64, 64, ["multiple of 128"]),
])
def test_impl_that_cannot_run_here_is_one_clear_line(impl, seq, blocks, expected):
    cfg = tiny_config(f"model.attention_impl={impl}", f"data.seq_len={seq}",
                      f"model.attention_block_q={blocks}", f"model.attention_block_kv={blocks}")
    model = Transformer(cfg.model, rngs=nnx.Rngs(0))
    with pytest.raises(UserError) as e:
        jax.eval_shape(lambda t: model(t)[0], jnp.ones((1, seq), jnp.int32))
    msg = str(e.value)
    assert "\n" not in msg
    for part in expected:
        assert part in msg


def test_registries_hold_exactly_the_declared_names():
    """config validates against moejax.names without importing the model; they must not drift."""
    from moejax.model import attention, dispatch, routing
    from moejax import optim
    assert tuple(attention.ATTENTIONS.names()) == names.ATTENTIONS
    assert tuple(attention.ROPE_SCALINGS.names()) == names.ROPE_SCALINGS
    assert ai.ATTENTION_IMPLS.names() == [n for n in names.ATTENTION_IMPLS if n != "auto"]
    assert routing.ROUTERS.names() == sorted(names.ROUTERS)
    assert {n: routing.ROUTERS.get(n).fixed_top_k for n in routing.ROUTERS.names()} == names.ROUTERS
    assert tuple(dispatch.DISPATCHERS.names()) == names.DISPATCHERS
    assert tuple(dispatch.GROUPED_FFNS.names()) == names.GROUPED_FFNS, \
        "declare new grouped FFNs in moejax/names.py GROUPED_FFNS"
    assert optim.PARAM_GROUPS == names.PARAM_GROUPS


def test_config_does_not_import_the_model():
    import subprocess
    import sys
    code = ("import sys, moejax.config as c; c.load(None, ['model.attention_impl=chunked']); "
            "print(sorted(m for m in sys.modules if m.startswith(('moejax.model', 'moejax.optim'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_unknown_impl_name_hints_the_nearest():
    with pytest.raises(UserError) as e:
        tiny_config("model.attention_impl=splahs")
    assert "did you mean 'splash'" in str(e.value) and "pallas_gpu" in str(e.value)



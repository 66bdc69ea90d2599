"""Where a training step's time goes: each part's forward + backward timed on its own.

    python benchmarks/step_profile.py [--set key=value ...] [--repeats 10]

Default shapes are the peer comparison's (benchmarks/peer_compare.py): vocab 4096, d_model 256,
4 layers, 8 heads / 4 KV heads, 8 experts top-2 of width 512, batch 8 x 256, float32. Parts, each a
jitted `value_and_grad` over its parameters and input, timed `--repeats` times after compilation and a
warm-up (median, ms), the per-layer parts multiplied by the layer count:
  attention  RMSNorm + attention + residual, one layer
  moe        RMSNorm + MoE block (router, dispatch, experts, combine) + residual, one layer
  head_ce    final RMSNorm + LM head + cross-entropy
  optimizer  the AdamW update of all parameters
and the whole train step (`moejax.bench`'s); "glue" is the step minus the parts. Wall time and
process CPU time (all threads) are both shown: on a shared machine the CPU time is steadier.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moejax import bench, config, parallel
from moejax.model.attention import ATTENTIONS
from moejax.model.layers import RMSNorm
from moejax.model.moe import MoEBlock
from moejax.optim import make_optimizer
from moejax.train import create_sharded_state, lm_loss_sum, make_train_step


def timeit(f, *args, repeats: int) -> tuple[float, float]:
    """Median wall time and median process CPU time (all threads) of a call, in seconds. On a
    shared machine the CPU time is the steadier measure of the work done."""
    jax.block_until_ready(f(*args))
    jax.block_until_ready(f(*args))
    wall, cpu = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        jax.block_until_ready(f(*args))
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def grad_of(module, loss):
    graphdef, params = nnx.split(module)
    return jax.jit(jax.value_and_grad(lambda p, *a: loss(nnx.merge(graphdef, p), *a), argnums=(0, 1))), params


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--repeats", type=int, default=10)
    a = p.parse_args()
    cfg = config.load(None, ["mesh.data=1"] + a.set)
    m, b, t = cfg.model, cfg.train.batch_size, cfg.data.seq_len
    rngs = nnx.Rngs(0)
    x = jax.random.normal(jax.random.key(1), (b, t, m.d_model), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    mask = jnp.ones((b, t), jnp.int32)  # segment ids
    ms = {}

    class AttnLayer(nnx.Module):
        def __init__(self):
            self.norm, self.attn = RMSNorm(m.d_model, m.norm_eps), ATTENTIONS.get(m.attention)(m, rngs=rngs)

    f, params = grad_of(AttnLayer(), lambda mod, x: jnp.sum(x + mod.attn(mod.norm(x), pos, mask)))
    ms["attention"] = [m.n_layers * v for v in timeit(f, params, x, repeats=a.repeats)]

    class MoELayer(nnx.Module):
        def __init__(self):
            self.norm, self.moe = RMSNorm(m.d_model, m.norm_eps), MoEBlock(m, rngs=rngs)

    f, params = grad_of(MoELayer(), lambda mod, x: jnp.sum(x + mod.moe(mod.norm(x)).y))
    ms["moe"] = [m.n_layers * v for v in timeit(f, params, x, repeats=a.repeats)]

    class Head(nnx.Module):
        def __init__(self):
            self.norm = RMSNorm(m.d_model, m.norm_eps)
            self.head = nnx.Param(0.02 * jax.random.normal(rngs.params(), (m.d_model, m.vocab_size)))

    targets = jax.random.randint(jax.random.key(2), (b, t), 0, m.vocab_size)
    ones = jnp.ones((b, t), jnp.float32)
    f, params = grad_of(Head(), lambda mod, x: lm_loss_sum(
        jnp.einsum("btd,dv->btv", mod.norm(x), mod.head[...], preferred_element_type=jnp.float32), targets, ones))
    ms["head_ce"] = timeit(f, params, x, repeats=a.repeats)

    mesh = parallel.make_mesh(cfg, jax.devices()[:1])
    opt = make_optimizer(cfg.train)
    graphdef, state = create_sharded_state(cfg, mesh, opt)
    grads = jax.tree.map(jnp.ones_like, state["params"])
    upd = jax.jit(lambda g, s, p: optax.apply_updates(p, opt.update(g, s, p)[0]))
    ms["optimizer"] = timeit(upd, grads, state["opt_state"], state["params"], repeats=a.repeats)

    step = jax.jit(make_train_step(graphdef, opt, cfg))
    batch = parallel.put_batch(bench.synthetic_batch(cfg, 0), mesh)
    with parallel.use_mesh(mesh):
        ms["step"] = timeit(lambda s, bt: step(s, bt)[1]["loss"], state, batch, repeats=a.repeats)
    ms["glue"] = [ms["step"][i] - sum(v[i] for k, v in ms.items() if k != "step") for i in (0, 1)]
    print(f"{'part':<10}{'wall ms':>10}{'share':>8}{'cpu ms':>10}{'share':>8}")
    for k, (w, c) in ms.items():
        print(f"{k:<10}{1e3 * w:10.1f}{100 * w / ms['step'][0]:7.1f}%{1e3 * c:10.1f}{100 * c / ms['step'][1]:7.1f}%")
    print(f"tokens/s of the step (wall): {b * t / ms['step'][0]:,.0f}")


if __name__ == "__main__":
    main()

"""`python -m moejax.train --config CFG [--set key.path=value ...]`: train, or resume, an MoE LM.

Everything of a run goes to `train.workdir`: config.yaml (resolved), tokenizer.model (when trained
here), metrics.jsonl, tensorboard/, checkpoints/. Running the same command again resumes from the
latest checkpoint, data position included, and gives the same losses as never stopping.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from flax import nnx

from moejax import config as config_lib
from moejax import distill
from moejax import flops as flops_lib
from moejax import parallel
from moejax.checkpoint import Checkpointer
from moejax.config import Config
from moejax.data import open_source
from moejax.data.pipeline import make_packer
from moejax.errors import UserError, run_cli
from moejax.evaluate import exact_match, held_out_questions, validation_batches, validation_loss
from moejax.losses import (fused_head_applies, head_loss_sum, lm_loss_sum,  # noqa: F401 (train.lm_loss_sum users)
                           make_eval_step)
from moejax.metrics import MetricsWriter
from moejax.model import routing
from moejax.optim import make_optimizer, schedule
from moejax.runs import build_model, tokenizer_path


# ----------------------------------------------------------------------------------------------
# The pure pieces: model/state construction, loss, the jitted steps.


def init_state(params: nnx.State, optimizer: optax.GradientTransformation) -> dict[str, Any]:
    return {"params": params, "opt_state": optimizer.init(params),
            "step": jnp.zeros((), jnp.int32), "nonfinite_step": jnp.full((), -1, jnp.int32)}


def create_sharded_state(cfg: Config, mesh, optimizer: optax.GradientTransformation):
    """(graphdef, state) with every parameter created directly in its sharding (no full copy on
    one device first) and the optimizer state following its parameter."""
    abstract = nnx.eval_shape(lambda: build_model(cfg))
    graphdef, abstract_params = nnx.split(abstract)
    shardings = parallel.state_shardings(abstract_params, mesh)
    params = jax.jit(lambda: nnx.split(build_model(cfg))[1], out_shardings=shardings)()
    # Optimizer moments take their parameter's sharding; counters and scalars are replicated.
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    abstract_state = jax.eval_shape(lambda p: init_state(p, optimizer), params)
    param_sh = jax.tree.map(lambda x: x.sharding, params)
    opt_sh = optax.tree_map_params(optimizer, lambda _, sh: sh, abstract_state["opt_state"], param_sh,
                                   transform_non_params=lambda _: replicated)
    out_sh = {"params": param_sh, "opt_state": opt_sh, "step": replicated,
              "nonfinite_step": replicated}
    state = jax.jit(lambda p: init_state(p, optimizer), out_shardings=out_sh)(params)
    return graphdef, state


def _forward(graphdef, params, batch, rng=None):
    model = nnx.merge(graphdef, params)
    return model(batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"],
                 rng=rng)


def _loss_parts(graphdef, params, batch, rng, want_logits: bool):
    """(LM loss sum, logits or None, aux): the head fused into the loss where it pays
    (`losses.fused_head_applies`), the [B, T, V] logits made only when asked for (distillation)."""
    model = nnx.merge(graphdef, params)
    x, aux = model.features(batch["tokens"], segment_ids=batch["segment_ids"],
                            positions=batch["positions"], rng=rng)
    head = model.head_weight()
    mesh = parallel.active_mesh()
    vocab_split = mesh is not None and mesh.shape.get("tensor", 1) > 1
    ce = head_loss_sum(x, head, batch["targets"], batch["loss_mask"],
                       fused=fused_head_applies(head, vocab_split))
    logits = None
    if want_logits:
        logits = parallel.constrain(jnp.einsum("btd,dv->btv", x, head, preferred_element_type=jnp.float32),
                                    ("batch", "length", "vocab"))
    return ce, logits, aux


def router_loss(aux: dict[str, jax.Array], moe) -> jax.Array:
    """sum over registered router losses of model.moe.<name>_coef * aux[name]."""
    return sum(getattr(moe, f"{name}_coef") * aux[name] for name in routing.LOSSES.names())


def update_router_biases(params: nnx.State, expert_load_le: jax.Array, rate: float) -> nnx.State:
    """DeepSeek-V3 aux-loss-free balancing: move every MoE layer's `router_bias` toward balance,
    using that layer's expert counts of this step (`expert_load_le`, MoE layers in order)."""
    flat = dict(nnx.to_flat_state(params))
    paths = sorted((p for p in flat if p[-1] == "router_bias"), key=lambda p: p[1])
    for row, path in enumerate(paths):
        var = flat[path]
        value = var.get_value()
        flat[path] = var.replace(routing.bias_update(value, expert_load_le[row, :value.shape[0]], rate))
    return nnx.from_flat_state(flat)


def make_train_step(graphdef, optimizer: optax.GradientTransformation, cfg: Config,
                    teacher_graphdef=None) -> Callable:
    """state, batch -> state, metrics. Total loss = LM loss + aux_coef * aux + z_coef * z; with
    grad_accum = A the batch is split into A micro-batches whose gradients are summed, which equals
    the full-batch gradient (the LM loss is normalised by the whole batch's target count).
    With `teacher_graphdef` and train.distill.alpha > 0 the LM loss mixes in the teacher's KL
    (`distill.mixed_loss`); with alpha = 0 the teacher is not run and the step is the plain one."""
    moe, tc = cfg.model.moe, cfg.train
    lr_at = schedule(tc)
    if not distill.active(cfg):
        teacher_graphdef = None

    def step(state, batch, teacher_params=None):
        params = state["params"]
        a = tc.grad_accum
        micro = jax.tree.map(lambda x: x.reshape(a, x.shape[0] // a, *x.shape[1:]), batch)
        n_targets = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
        keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(tc.seed + 1), state["step"]), a)

        def one(grads, mb_key):
            mb, key = mb_key

            teacher_logits = (None if teacher_graphdef is None else  # train.distill: frozen, forward only
                              jax.lax.stop_gradient(_forward(teacher_graphdef, teacher_params, mb)[0]))

            def loss_fn(p):
                ce, logits, aux = _loss_parts(graphdef, p, mb, key, want_logits=teacher_logits is not None)
                lm = ce / n_targets if teacher_logits is None else distill.mixed_loss(
                    ce, logits, teacher_logits, mb["loss_mask"], n_targets, tc.distill)
                return lm + router_loss(aux, moe) / a, (ce, aux)

            (_, (ce, aux)), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
            outs = (ce, aux["aux_loss"], aux["z_loss"], aux["expert_load"], aux["dropped_fraction"])
            return (g if grads is None else jax.tree.map(jnp.add, grads, g)), outs

        if a == 1:  # no loop: a one-trip scan stays a while loop on XLA:CPU (a copy and an add per step)
            g, outs = one(None, (jax.tree.map(lambda x: x[0], micro), keys[0]))
            grads, (ce, aux_l, z_l, load, dropped) = g, jax.tree.map(lambda x: x[None], outs)
        else:
            zeros = jax.tree.map(jnp.zeros_like, params)
            grads, (ce, aux_l, z_l, load, dropped) = jax.lax.scan(one, zeros, (micro, keys))
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        if moe.bias_update_rate > 0:
            new_params = update_router_biases(new_params, jnp.sum(load, axis=0), moe.bias_update_rate)
        loss = jnp.sum(ce) / n_targets
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if tc.skip_nonfinite:
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
            new_params, opt_state = keep(new_params, params), keep(opt_state, state["opt_state"])
        first_bad = jnp.where((state["nonfinite_step"] < 0) & ~finite, state["step"] + 1,
                              state["nonfinite_step"])
        load = jnp.mean(load, axis=0)
        metrics = {
            "loss": loss, "aux_loss": jnp.mean(aux_l), "z_loss": jnp.mean(z_l),
            "grad_norm": grad_norm, "lr": lr_at(state["step"]), "dropped_fraction": jnp.mean(dropped),
            "expert_load": load / jnp.maximum(jnp.sum(load, axis=-1, keepdims=True), 1.0),
            "skipped": (~finite).astype(jnp.int32) if tc.skip_nonfinite else jnp.zeros((), jnp.int32),
        }
        new_state = {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1,
                     "nonfinite_step": first_bad}
        return new_state, metrics

    return step


# ----------------------------------------------------------------------------------------------
# Run setup: workdir, tokenizer, data, checkpoint.


def prepare_workdir(cfg: Config) -> str:
    """Create the workdir; refuse a workdir whose earlier run had another model architecture."""
    workdir = cfg.train.workdir
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.yaml")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = (yaml.safe_load(f) or {}).get("model")
        new = config_lib.to_dict(cfg)["model"]
        if old is not None and old != new:
            diff = [k for k in new if old.get(k) != new[k]]
            raise UserError(f"train.workdir {workdir!r} holds a run with another model config "
                            f"(model.{diff[0]} was {old.get(diff[0])!r}, now {new[diff[0]]!r}); "
                            "use a new train.workdir")
    if jax.process_index() == 0:
        config_lib.dump(cfg, path)
    return workdir


def load_tokenizer(cfg: Config, workdir: str, train_source):
    from moejax.runs import load_tokenizer as load_run_tokenizer
    from moejax.tokenizer import train_tokenizer
    from moejax.data.pipeline import iter_texts

    path = tokenizer_path(cfg, workdir)
    if not os.path.exists(path):
        if cfg.data.tokenizer:
            raise UserError(f"data.tokenizer {path!r} does not exist")
        say(f"training a {cfg.model.vocab_size}-token SentencePiece tokenizer on {cfg.data.source} "
              f"-> {path}")
        train_tokenizer(iter_texts(train_source, limit=20000), cfg.model.vocab_size, path)
    return load_run_tokenizer(cfg, workdir)


def _prepare_data(cfg: Config, workdir: str):
    """Open the sources and load (or train) the tokenizer; with several processes, process 0 does
    any building first (the embedded dataset, the tokenizer) and the others then read it."""
    def prepare():
        train_src = open_source(cfg.data.source, "train", cfg.data)
        eval_src = open_source(cfg.data.source, cfg.data.eval_split, cfg.data)
        return train_src, eval_src, load_tokenizer(cfg, workdir, train_src)

    if jax.process_count() == 1:
        return prepare()
    from jax.experimental import multihost_utils
    if jax.process_index() == 0:
        out = prepare()
    multihost_utils.sync_global_devices("moejax: data and tokenizer ready")
    return out if jax.process_index() == 0 else prepare()


class _StopRequest:
    """SIGTERM (a preempted VM) or SIGINT ask the loop to save and stop at the next step boundary."""

    def __init__(self):
        self.signal: str | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name


def say(message: str) -> None:
    """Progress output, from process 0 only (every host runs the same loop)."""
    if jax.process_index() == 0:
        print(message, flush=True)


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


# ----------------------------------------------------------------------------------------------
# The loop.


def jit_train_step(graphdef, optimizer, cfg: Config, state, mesh, teacher=None, start: int = 0):
    """The jitted train step: the state donated, its shardings pinned on the way in and out (so it
    never moves between steps), the batch sharded over the batch axes. With `teacher` =
    (graphdef, params) (train.distill) it distils until train.distill.stop_step, then runs the
    plain step (`distill.staged`)."""
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    plain = jax.jit(make_train_step(graphdef, optimizer, cfg), donate_argnums=0,
                    in_shardings=(state_sharding, parallel.batch_sharding(mesh)),
                    out_shardings=(state_sharding, None))
    if teacher is None:
        return plain
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    t_params = jax.device_put(teacher[1], replicated)
    kd = jax.jit(make_train_step(graphdef, optimizer, cfg, teacher[0]), donate_argnums=0,
                 in_shardings=(state_sharding, parallel.batch_sharding(mesh), replicated),
                 out_shardings=(state_sharding, None))
    return distill.staged(kd, plain, t_params, cfg.train.distill.stop_step, start)


def train(cfg: Config) -> dict[str, Any]:
    """Run (or resume) training; returns the last logged metrics (with the final eval)."""
    tc = cfg.train
    mesh = parallel.make_mesh(cfg)
    workdir = prepare_workdir(cfg)
    train_src, eval_src, tokenizer = _prepare_data(cfg, workdir)
    # The teacher is checked (vocabulary, tokenizer) before the checkpoint directory is made.
    teacher = distill.load_teacher(cfg) if distill.active(cfg) else None
    packer = make_packer(cfg, train_src, tokenizer, shard_index=jax.process_index(),
                         shard_count=jax.process_count())
    eval_batches = validation_batches(cfg, eval_src, tokenizer)
    questions = held_out_questions(eval_src, cfg.data.eval_questions)

    optimizer = make_optimizer(tc)
    graphdef, state = create_sharded_state(cfg, mesh, optimizer)
    params = state["params"]
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tc.keep_checkpoints)
    start = 0
    if ckpt.latest_step() is not None:
        state, data_state = ckpt.restore(state)
        packer.set_state(data_state)
        start = int(state["step"])
        say(f"resumed from {ckpt.directory} at step {start}")
    n_params = sum(x.size for x in jax.tree.leaves(params))
    say(f"model: {n_params / 1e6:.2f}M parameters "
          f"({flops_lib.matmul_params_per_token(cfg.model) / 1e6:.2f}M active matmul params/token); "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s); workdir {workdir}")

    train_step = jit_train_step(graphdef, optimizer, cfg, state, mesh, teacher, start)
    eval_step = make_eval_step(graphdef)
    writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)
    stop = _StopRequest()
    tokens_per_step = tc.batch_size * cfg.data.seq_len
    flops_per_step = flops_lib.train_flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_step
    peak = flops_lib.peak_tflops(override=tc.peak_tflops)

    def evaluate(params) -> dict[str, float]:
        out = {"eval_loss": validation_loss(eval_step, params, eval_batches, mesh)}
        # Greedy decoding reads whole arrays on one host; across processes only the loss is measured.
        if jax.process_count() == 1:
            from moejax.analyze import routing_metrics
            model = nnx.merge(graphdef, params)
            out.update(exact_match(model, tokenizer, questions))
            # Balance and domain specialisation: the statistics of `python -m moejax.analyze`.
            out.update(routing_metrics(model, tokenizer, questions, cfg.data.seq_len))
        return out

    def save(step: int, state) -> None:
        ckpt.save(step, state, packer.get_state())

    with parallel.use_mesh(mesh):
        return _loop(cfg, mesh, state, packer, train_step, evaluate, save, ckpt, writer, stop,
                     start, tokens_per_step, flops_per_step, peak)


def _loop(cfg, mesh, state, packer, train_step, evaluate, save, ckpt, writer, stop, start,
          tokens_per_step, flops_per_step, peak) -> dict[str, Any]:
    tc = cfg.train
    window: list[dict] = []  # metrics since the last log line (device arrays: no host sync per step)
    timed = 0                # steps of the window that count for throughput (not the compile step)
    t_window = time.perf_counter()
    t_first = None
    last: dict[str, Any] = {}
    step = start
    try:
        while step < tc.steps:
            state, metrics = train_step(state, parallel.put_batch(next(packer), mesh))
            step += 1
            window.append(metrics)
            timed += 1
            if t_first is None:  # the first step includes compilation; time the ones after it
                jax.block_until_ready(metrics["loss"])
                t_first = t_window = time.perf_counter()
                timed = 0
            if step % tc.log_every == 0 or step == tc.steps:
                last = _log(step, window, timed, t_window, t_first, start, tc, tokens_per_step,
                            flops_per_step, peak, writer)
                _check_finite(state, tc)
                window, timed, t_window = [], 0, time.perf_counter()
            if step % tc.eval_every == 0 or step % tc.save_every == 0:
                jax.block_until_ready(state["step"])  # finish the pending steps inside the window
            t_pause = time.perf_counter()  # eval and checkpoint time is not training throughput
            if step % tc.eval_every == 0 or step == tc.steps:
                _check_finite(state, tc)
                ev = evaluate(state["params"])
                writer.write(step, ev)
                last.update(ev)
                say(f"eval step {step}: " + " | ".join(f"{k} {v:.4f}" for k, v in ev.items()))
            if step % tc.save_every == 0 or step == tc.steps:
                _check_finite(state, tc)
                save(step, state)
            paused = time.perf_counter() - t_pause
            t_window += paused
            if t_first is not None:
                t_first += paused
            if stop.signal:
                _check_finite(state, tc)
                if step % tc.save_every and step != tc.steps:
                    save(step, state)
                ckpt.wait()
                say(f"{stop.signal} received: saved a checkpoint at step {step}; run the same "
                      "command to resume")
                break
    finally:
        ckpt.wait()
        ckpt.close()
        writer.close()
    return last


def _check_finite(state, tc) -> None:
    bad = int(state["nonfinite_step"])
    if bad >= 0 and not tc.skip_nonfinite:
        raise UserError(f"the loss or gradients became NaN/inf at step {bad}; lower train.lr, set "
                        "train.grad_clip, or set train.skip_nonfinite=true to skip such steps")


def _log(step, window, timed, t_window, t_first, start, tc, tokens_per_step, flops_per_step, peak,
         writer) -> dict[str, Any]:
    host = jax.device_get(window)
    scalars = {k: float(np.mean([m[k] for m in host])) for k in host[0] if k != "expert_load"}
    scalars["skipped"] = int(sum(m["skipped"] for m in host))
    out: dict[str, Any] = dict(scalars)
    speed = ""
    if timed:
        step_time = (time.perf_counter() - t_window) / timed
        tflops = flops_per_step / step_time / jax.device_count() / 1e12
        out.update(tokens_per_sec=tokens_per_step / step_time, step_time_s=step_time,
                   tflops_per_device=tflops, mfu=tflops / peak if peak else None)
        speed = f" | {out['tokens_per_sec']:,.0f} tok/s"
        if out["mfu"] is not None:
            speed += f" | MFU {100 * out['mfu']:.1f}%"
    out["expert_load"] = np.mean([m["expert_load"] for m in host], axis=0).round(4)
    writer.write(step, out)
    rate = (time.perf_counter() - t_first) / max(step - start - 1, 1)
    say(f"step {step}/{tc.steps} | loss {scalars['loss']:.4f} | aux {scalars['aux_loss']:.3f}"
          f"{speed} | lr {scalars['lr']:.2e} | ETA {_fmt_time(rate * (tc.steps - step))}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moejax.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), e.g. --set train.steps=100")
    args = p.parse_args(argv)
    cfg = config_lib.load(args.config, args.set)
    parallel.maybe_initialize_distributed()
    train(cfg)
    return 0


if __name__ == "__main__":
    run_cli(main)

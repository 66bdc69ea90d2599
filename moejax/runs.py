"""Run directories: build a run's model, load its config and checkpointed parameters, its tokenizer.

One module that every command reading a run goes through (train, generate, evaluate, analyze,
convert, compress), so none of them imports another command. It imports only config, checkpoint and
model: nothing of training, data pipelines or analysis.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import config as config_lib
from moejax.checkpoint import Checkpointer
from moejax.config import Config
from moejax.errors import UserError
from moejax.model import Transformer


def build_model(cfg: Config) -> Transformer:
    """A freshly initialised model of `cfg` (seed `train.seed`, dtype `train.dtype`, remat)."""
    return Transformer(cfg.model, rngs=nnx.Rngs(cfg.train.seed), dtype=jnp.dtype(cfg.train.dtype),
                       remat=cfg.train.remat)


def load_config(workdir: str) -> Config:
    """The resolved config a run directory was trained with (`WORKDIR/config.yaml`)."""
    cfg_path = os.path.join(workdir, "config.yaml")
    if not os.path.isfile(cfg_path):
        raise UserError(f"{workdir!r} is not a moejax run directory (no config.yaml)")
    return config_lib.load(cfg_path)


def load_model(workdir: str, step: int | None = None) -> tuple[Config, Transformer]:
    """The config and model (parameters of the latest checkpoint, or of `step`, on one device) of a
    run directory. Only the parameters are read, so any run's checkpoint works, sharded or not."""
    cfg = load_config(workdir)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        if ckpt.latest_step() is None:
            raise UserError(f"run directory {workdir!r} has no checkpoint yet")
        if step is not None and step not in ckpt.manager.all_steps():
            raise UserError(f"run directory {workdir!r} has no checkpoint at step {step}; it has "
                            f"{sorted(ckpt.manager.all_steps())}")
        graphdef, params = nnx.split(nnx.eval_shape(lambda: build_model(cfg)))
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), params)
        return cfg, nnx.merge(graphdef, ckpt.restore_params(params, step))
    finally:
        ckpt.close()


def tokenizer_path(cfg: Config, workdir: str) -> str:
    """Where a run's tokenizer is: `data.tokenizer` (relative paths are relative to the run directory
    when they exist there: import-hf writes `tokenizer`), else the one trained into the run directory."""
    if not cfg.data.tokenizer:
        return os.path.join(workdir, "tokenizer.model")
    inside = os.path.join(workdir, cfg.data.tokenizer)
    if not os.path.isabs(cfg.data.tokenizer) and not os.path.exists(cfg.data.tokenizer) and os.path.exists(inside):
        return inside
    return cfg.data.tokenizer


def check_vocab(tok, cfg: Config, path: str) -> None:
    """Every tokenizer id must have an embedding row (a larger, padded embedding is fine)."""
    if tok.vocab_size > cfg.model.vocab_size:
        raise UserError(f"tokenizer {path!r} has ids up to {tok.vocab_size - 1} but model.vocab_size is "
                        f"{cfg.model.vocab_size}: every token id needs an embedding row; raise "
                        "model.vocab_size or use the checkpoint's own tokenizer")


def load_tokenizer(cfg: Config, workdir: str):
    """The run's tokenizer (`moejax.tokenizer.load`) with `data.chat_template` applied, checked
    against model.vocab_size."""
    from moejax.tokenizer import load

    path = tokenizer_path(cfg, workdir)
    tok = load(path, cfg.data.chat_template or None)
    check_vocab(tok, cfg, path)
    return tok


def restore_model(workdir: str) -> tuple[Config, Transformer, Any]:
    """The config, model (`load_model`) and tokenizer of a run directory."""
    cfg, model = load_model(workdir)
    return cfg, model, load_tokenizer(cfg, workdir)

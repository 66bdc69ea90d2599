"""`python -m moejax.convert COMMAND ...`: checkpoint conversions.

  import-hf HF_DIR WORKDIR [--config CFG] [--set key=value ...] [--tokenizer PATH]
      a Hugging Face checkpoint directory -> a moejax run directory (config.yaml + an orbax checkpoint
      at step 0) that `python -m moejax.train --config WORKDIR/config.yaml` resumes (fine-tunes); the
      checkpoint's tokenizer files are copied to WORKDIR/tokenizer and data.tokenizer points there
  export-hf WORKDIR OUT_DIR [--model-type T] [--dtype D] [--max-shard-size S] [--step N]
      a moejax run directory's latest (or given) checkpoint -> a Hugging Face checkpoint directory

Each command is a `Command` in the `COMMANDS` registry, added with the `command` decorator; modules
listed in `COMMAND_MODULES` are imported first so that theirs are registered too. `load_run` and
`save_run` read and write run directories for every command.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
from typing import Any, Callable, NamedTuple

import jax
import yaml
from flax import nnx

from moejax import config as config_lib
from moejax.config import Config
from moejax.errors import UserError, run_cli
from moejax.registry import Registry


class Command(NamedTuple):
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]   # adds the command's arguments
    run: Callable[[argparse.Namespace], int | None]


COMMANDS: Registry[Command] = Registry("convert command")
# Modules that register more commands when imported (e.g. dense -> MoE conversions).
COMMAND_MODULES: tuple[str, ...] = ("moejax.dense_to_moe", "moejax.compress.convert_commands")


def command(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None]):
    """Register `run(args)` as the subcommand `name`."""
    def add(run: Callable[[argparse.Namespace], int | None]):
        COMMANDS.register(name)(Command(help, arguments, run))
        return run
    return add


# ----------------------------------------------------------------------------------------------
# Run directories.


def save_run(model: nnx.Module, cfg: Config, workdir: str) -> Config:
    """Write `model` as a fresh run directory: `config.yaml` (with train.workdir = workdir) and a step-0
    checkpoint holding the parameters, a zero optimizer state and the data position of a run that
    has not started, so `python -m moejax.train --config WORKDIR/config.yaml` resumes from it. The
    data source is opened once to size that position. Returns the config written."""
    from moejax.checkpoint import Checkpointer
    from moejax.data import open_source
    from moejax.data.packing import Packer
    from moejax.optim import make_optimizer
    from moejax.train import init_state

    workdir = os.fspath(workdir)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if os.path.exists(os.path.join(workdir, "config.yaml")) or \
            (os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir)):
        raise UserError(f"{workdir!r} already holds a run; choose a new directory")
    cfg = config_lib.from_dict({**config_lib.to_dict(cfg),
                                "train": {**config_lib.to_dict(cfg.train), "workdir": workdir}})
    source = open_source(cfg.data.source, "train", cfg.data)
    data_state = Packer(source, None, cfg.data.seq_len, cfg.train.batch_size, cfg.train.seed).get_state()
    os.makedirs(workdir, exist_ok=True)
    state = init_state(nnx.state(model), make_optimizer(cfg.train))
    ckpt = Checkpointer(ckpt_dir, keep=cfg.train.keep_checkpoints)
    ckpt.save(0, state, data_state)
    ckpt.wait()
    ckpt.close()
    config_lib.dump(cfg, os.path.join(workdir, "config.yaml"))
    return cfg


def load_run(workdir: str, step: int | None = None) -> tuple[nnx.Module, Config]:
    """The model (parameters of the latest checkpoint, or of `step`) and config of a run directory.
    Unlike `moejax.runs.restore_model` it needs no tokenizer."""
    from moejax.runs import load_model

    cfg, model = load_model(workdir, step)
    return model, cfg


def _tokenizer_path(cfg: Config, workdir: str) -> str:
    from moejax.runs import tokenizer_path

    return tokenizer_path(cfg, workdir)


def _copy_tokenizer_files(src_dir: str, dst_dir: str) -> list[str]:
    from moejax.tokenizer.hf import TOKENIZER_FILES

    os.makedirs(dst_dir, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src_dir, name)):
            shutil.copyfile(os.path.join(src_dir, name), os.path.join(dst_dir, name))
            copied.append(name)
    return copied


# ----------------------------------------------------------------------------------------------
# Hugging Face.


def _import_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("hf_dir", help="Hugging Face checkpoint directory (config.json + *.safetensors)")
    p.add_argument("workdir", help="the moejax run directory to create")
    p.add_argument("--config", help="YAML config whose data/train/mesh sections the run uses (its model "
                   "section is replaced by the checkpoint's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key after the mapping (repeatable), e.g. model.moe.dispatch=dense")
    p.add_argument("--tokenizer", help="a tokenizer (Hugging Face directory or SentencePiece .model) to "
                   "use instead of the checkpoint's own tokenizer files; its ids must be the checkpoint's")


@command("import-hf", "Hugging Face checkpoint directory -> moejax run directory", _import_args)
def import_hf(args: argparse.Namespace) -> int:
    from moejax.interop import hf

    base: dict[str, Any] = {}
    if args.config:
        config_lib.load(args.config)  # the usual errors for a missing file or a bad key
        with open(args.config, encoding="utf-8") as f:
            base = yaml.safe_load(f) or {}
        base.pop("model", None)
    from moejax import tokenizer as tokenizer_lib
    from moejax.runs import check_vocab

    model, cfg = hf.from_pretrained(args.hf_dir, args.set, base=base)
    # The tokenizer: --tokenizer, else the checkpoint's own files (checked before anything is written).
    source = args.tokenizer
    if source is None and any(os.path.isfile(os.path.join(args.hf_dir, f))
                              for f in ("tokenizer.json", "tokenizer.model")):
        source = args.hf_dir
    if source is not None:
        check_vocab(tokenizer_lib.load(source, cfg.data.chat_template or None), cfg, source)
        target = os.path.abspath(os.path.join(args.workdir, "tokenizer" if os.path.isdir(source)
                                              else "tokenizer.model"))
        cfg = config_lib.from_dict({**config_lib.to_dict(cfg),
                                    "data": {**config_lib.to_dict(cfg.data), "tokenizer": target}})
    cfg = save_run(model, cfg, args.workdir)
    if source is not None and os.path.isdir(source):
        _copy_tokenizer_files(source, target)
    elif source is not None:
        shutil.copyfile(source, target)
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
    print(f"imported {args.hf_dir} ({n / 1e6:.2f}M parameters) -> {args.workdir}; fine-tune with: "
          f"python -m moejax.train --config {os.path.join(args.workdir, 'config.yaml')}")
    if source is None:
        print(f"note: {args.hf_dir} has no tokenizer.json or tokenizer.model and no --tokenizer was "
              "given: set data.tokenizer to the checkpoint's tokenizer; training would otherwise make a "
              "new tokenizer that does not match the embeddings", file=sys.stderr)
    return 0


def _export_args(p: argparse.ArgumentParser) -> None:
    from moejax.interop import hf

    p.add_argument("workdir", help="moejax run directory")
    p.add_argument("out_dir", help="Hugging Face checkpoint directory to write")
    p.add_argument("--model-type", choices=hf.FAMILIES.names(),
                   help="Hugging Face family to write (default: the first that represents the model: "
                   f"{', '.join(hf.EXPORT_ORDER)})")
    p.add_argument("--dtype", default="float32", choices=list(hf.EXPORT_DTYPES), help="tensor dtype")
    p.add_argument("--max-shard-size", default="5GB", help="split into shards of at most this size")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")


@command("export-hf", "moejax run directory -> Hugging Face checkpoint directory", _export_args)
def export_hf(args: argparse.Namespace) -> int:
    from moejax.interop import hf

    model, cfg = load_run(args.workdir, args.step)
    path = _tokenizer_path(cfg, args.workdir)
    tok = None
    if os.path.exists(path):
        from moejax.runs import load_tokenizer

        tok = load_tokenizer(cfg, args.workdir)
    ids = {}
    if tok is not None:
        # pad only when the tokenizer names one: transformers' generate masks out every pad id in a
        # prompt, and a stand-in pad (eos, e.g. <|eot_id|>) occurs in every chat prompt.
        pad = tok.pad_id if "pad_token" in tok.special_tokens else None
        ids = {f"{k}_token_id": i for k, i in (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", pad))
               if i is not None and i >= 0}
    model_type = hf.to_pretrained(model, cfg, args.out_dir, model_type=args.model_type, dtype=args.dtype,
                                  max_shard_size=args.max_shard_size, extra=ids)
    if tok is not None:
        from moejax.tokenizer.export import write_tokenizer

        write_tokenizer(tok, args.out_dir)
    print(f"exported {args.workdir} -> {args.out_dir} ({model_type}, {args.dtype})")
    return 0


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    for module in COMMAND_MODULES:
        importlib.import_module(module)
    p = argparse.ArgumentParser(prog="python -m moejax.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS.names():
        c = COMMANDS.get(name)
        c.arguments(sub.add_parser(name, help=c.help, description=c.help))
    args = p.parse_args(argv)
    return COMMANDS.get(args.command).run(args) or 0


if __name__ == "__main__":
    # Run the imported module's main, so that commands registered by COMMAND_MODULES (which import
    # `moejax.convert`, not `__main__`) land in the registry main reads.
    from moejax.convert import main as _main
    run_cli(_main)

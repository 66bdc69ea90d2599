"""`python -m moejax.tokenizer train --config CFG [--set k=v ...] [--out PATH] [--limit N]`: train a
moejax SentencePiece tokenizer on the config's training data."""
from __future__ import annotations

import argparse
import os
from typing import Sequence

from moejax.errors import UserError, run_cli
from moejax.tokenizer.moejax_spm import Tokenizer, train_tokenizer


def train_from_config(cfg, out: str | None = None, limit: int | None = 20_000) -> tuple[Tokenizer, str]:
    """Train on up to `limit` examples of cfg.data.source's train split with cfg.model.vocab_size;
    write to `out`, else cfg.data.tokenizer, else WORKDIR/tokenizer.model."""
    from moejax import data  # a command: the data sources are upstream of the tokenizer
    from moejax.data.pipeline import iter_texts

    path = out or cfg.data.tokenizer or os.path.join(cfg.train.workdir, "tokenizer.model")
    source = data.open_source(cfg.data.source, "train", cfg.data)
    tok = train_tokenizer(iter_texts(source, limit), cfg.model.vocab_size, path)
    return tok, path


def main(argv: Sequence[str] | None = None) -> int:
    from moejax import config

    parser = argparse.ArgumentParser(prog="python -m moejax.tokenizer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="Train a tokenizer on the config's training data.")
    train.add_argument("--config", default=None, help="YAML config (default: built-in defaults).")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="Override a config value, e.g. --set model.vocab_size=8192 (repeatable).")
    train.add_argument("--out", default=None,
                       help="Model file to write (default: data.tokenizer, else WORKDIR/tokenizer.model).")
    train.add_argument("--limit", type=int, default=20_000,
                       help="Examples to train on, spread over the source (default: 20000).")
    args = parser.parse_args(argv)
    if args.limit < 1:
        raise UserError(f"--limit = {args.limit} is out of range: must be >= 1")
    cfg = config.load(args.config, args.set)
    tok, path = train_from_config(cfg, args.out, args.limit)
    print(f"wrote {path} (vocab_size {tok.vocab_size}, requested {cfg.model.vocab_size})")
    return 0


if __name__ == "__main__":
    run_cli(main)

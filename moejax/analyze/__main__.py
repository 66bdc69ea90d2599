"""`python -m moejax.analyze --workdir RUN --out REPORT [--data SOURCE ...] [--max-tokens N]`.

Runs the run's latest checkpoint over one or more datasets and writes REPORT/routing.json, PNG plots
and REPORT/index.html. `--data run` (the default) is the run's own `data.eval_split`, one domain per
domain tag; any other `--data` (`tfds:NAME`, `jsonl:PATH`, optionally `LABEL=SOURCE`) is one domain.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

from moejax.errors import UserError, run_cli

DEFAULT_MAX_TOKENS = 20_000


def piece_fn(tokenizer):
    """Token id -> its text (SentencePiece piece, `▁` as a space, byte pieces as their character)."""
    sp = getattr(tokenizer, "sp", None)

    def piece(i: int) -> str:
        if sp is None:
            return tokenizer.decode([i])
        p = sp.id_to_piece(int(i))
        if p.startswith("<0x") and p.endswith(">") and len(p) == 6:
            return bytes.fromhex(p[3:5]).decode("utf-8", "replace")
        return p.replace("\u2581", " ")

    return piece


def _latest_step(workdir: str):
    d = os.path.join(workdir, "checkpoints")
    steps = [int(n) for n in os.listdir(d) if n.isdigit()] if os.path.isdir(d) else []
    return max(steps) if steps else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moejax.analyze", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="run directory (train.workdir) with a checkpoint")
    p.add_argument("--out", required=True, help="report directory (created)")
    p.add_argument("--data", action="append", metavar="SOURCE",
                   help="'run' (default), tfds:NAME or jsonl:PATH, optionally LABEL=SOURCE; repeatable, "
                        "each non-'run' source is one domain")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"tokens read per domain (default {DEFAULT_MAX_TOKENS:,})")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffled-label chance level")
    args = p.parse_args(argv)
    if args.max_tokens < 1 or args.batch_size < 1:
        raise UserError("--max-tokens and --batch-size must be >= 1")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out!r} exists and is not a directory")
    from moejax import config as config_lib
    from moejax.analyze import collect, plots, report, stats  # heavy imports after argument checks
    from moejax.runs import load_tokenizer

    t0 = time.perf_counter()
    # The cheap checks (run directory, checkpoint, data sources) before restoring the model.
    cfg_path = os.path.join(args.workdir, "config.yaml")
    if not os.path.exists(cfg_path):
        raise UserError(f"{args.workdir!r} is not a moejax run directory (no config.yaml)")
    if _latest_step(args.workdir) is None:
        raise UserError(f"run directory {args.workdir!r} has no checkpoint yet")
    cfg = config_lib.load(cfg_path)
    if not cfg.model.moe.num_experts:
        raise UserError(f"the model in {args.workdir!r} has no MoE layer (model.moe.num_experts = 0): "
                        "there is no routing to analyse")
    tok = load_tokenizer(cfg, args.workdir)
    count = lambda ex: min(len(tok.encode_chat(ex)[0]) - 1, cfg.data.seq_len)  # noqa: E731
    domains = collect.read_domains(args.data or [collect.RUN_DATA], cfg.data, args.max_tokens, count)
    domains = [(d, exs) for d, exs in domains if exs]
    if not domains:
        raise UserError("no examples to analyse in " + ", ".join(args.data or [cfg.data.source]))
    cfg, model, tok = collect.restore_params(args.workdir)
    names = collect.moe_layer_names(model)
    seqs, dom, labels = collect.encode(tok, domains)
    print(f"analysing {len(seqs):,} sequences of {len(labels)} domain(s) "
          f"({', '.join(labels)}) through {len(names)} MoE layer(s)", file=sys.stderr, flush=True)
    got = collect.collect(model, seqs, dom, labels, cfg.data.seq_len, batch_size=args.batch_size,
                          seed=args.seed, progress=True)
    piece = piece_fn(tok)
    summary = stats.summarize(got.tally, piece, got.layer_names)
    os.makedirs(args.out, exist_ok=True)
    meta = {"workdir": os.path.abspath(args.workdir), "checkpoint step": _latest_step(args.workdir),
            "data": ", ".join(args.data or [f"run ({cfg.data.source}, {cfg.data.eval_split})"]),
            "router": f"{cfg.model.moe.router}, top_k {cfg.model.moe.top_k}",
            "date": datetime.date.today().isoformat()}
    with open(os.path.join(args.out, "routing.json"), "w", encoding="utf-8") as f:
        json.dump({"meta": meta, **summary, "samples": got.samples}, f)
    figures = plots.write_all(summary, got.samples, piece, args.out)
    path = report.write_html(summary, figures, args.out, meta)
    for line in report.summary_text(summary):
        print(line)
    print(f"wrote {path} ({len(figures)} plots, routing.json) in {time.perf_counter() - t0:.0f} s",
          flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)

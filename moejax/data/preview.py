"""`python -m moejax.data preview --config CFG [--set k=v ...] [-n 3] [--limit N]`: see what training
reads. Prints `n` conversations as the tokenizer renders them, with the trained tokens (loss mask 1)
between ⟦ and ⟧, then totals over `limit` conversations spread over the training split:
conversations, tokens, share trained, truncated (longer than data.seq_len + 1), and skipped with
their reasons (records skipped when the file was indexed, and conversations the chat template
refuses)."""
from __future__ import annotations

import argparse
import os
from collections import Counter
from typing import Any, Sequence

from moejax.data.chat import ChatEncoder, Skip
from moejax.data.sources import open_source
from moejax.errors import UserError

OPEN, CLOSE = "\u27e6", "\u27e7"


def marked(tokenizer: Any, ids: Sequence[int], mask: Sequence[int]) -> str:
    """The decoded ids, each run of trained tokens wrapped in ⟦ ⟧ (special tokens kept)."""
    out, start = [], 0
    for k in range(1, len(ids) + 1):
        if k == len(ids) or bool(mask[k]) != bool(mask[start]):
            text = _decode(tokenizer, ids[start:k])
            if not text and list(ids[start:k]) == [getattr(tokenizer, "eos_id", None)]:
                text = "<eos>"  # a decoder that drops EOS: still show that it is trained
            out.append(f"{OPEN}{text}{CLOSE}" if mask[start] else text)
            start = k
    return "".join(out)


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    try:
        return tokenizer.decode(list(ids), skip_special_tokens=False)
    except TypeError:  # moejax's own tokenizer: decode(ids)
        return tokenizer.decode(list(ids))


def load_tokenizer(cfg) -> Any:
    from moejax.runs import tokenizer_path

    path = tokenizer_path(cfg, cfg.train.workdir)
    if not os.path.exists(path):
        raise UserError(f"no tokenizer at {path!r}: set data.tokenizer (a Hugging Face tokenizer "
                        "directory or a SentencePiece model) or train one with `python -m moejax.tokenizer "
                        "train --config ...`")
    import moejax.tokenizer as tok_lib
    if hasattr(tok_lib, "load"):
        return tok_lib.load(path)
    return tok_lib.Tokenizer.load(path)


def preview(cfg, n: int = 3, limit: int = 2000, tokenizer: Any = None) -> dict[str, Any]:
    """Print the examples and totals; returns the totals."""
    source = open_source(cfg.data.source, "train", cfg.data)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg)
    encode = ChatEncoder(tokenizer, getattr(cfg.data, "chat_template", "") or None)
    count = len(source) if limit <= 0 else min(limit, len(source))
    totals = {"conversations": 0, "tokens": 0, "trained_tokens": 0, "truncated": 0, "skipped": 0}
    reasons: Counter[str] = Counter()
    for j in range(count):
        i = j * len(source) // count
        item = encode(source[i])
        if isinstance(item, Skip):
            totals["skipped"] += 1
            reasons[f"chat template: {item.reason}"] += 1
            continue
        ids, mask = item
        totals["conversations"] += 1
        totals["tokens"] += len(ids)
        totals["trained_tokens"] += sum(1 for m in mask if m)
        totals["truncated"] += len(ids) > cfg.data.seq_len + 1
        if totals["conversations"] <= n:
            print(f"--- example {i} of {len(source)} ({len(ids)} tokens, "
                  f"{sum(1 for m in mask if m)} trained, between {OPEN} {CLOSE}) ---")
            print(marked(tokenizer, ids, mask))
    whole = getattr(getattr(source, "source", None), "skipped", 0)  # skipped while indexing
    if whole:
        reasons[f"when indexed (whole file): {source.source.skip_summary}"] += whole
    share = totals["trained_tokens"] / max(totals["tokens"], 1)
    print(f"--- totals over {count} of {len(source)} training conversations of {cfg.data.source} ---")
    print(f"conversations {totals['conversations']} | tokens {totals['tokens']} | trained "
          f"{100 * share:.1f}% | truncated at seq_len {cfg.data.seq_len}: {totals['truncated']} | "
          f"skipped {totals['skipped'] + whole}")
    for reason, k in reasons.most_common():
        print(f"  skipped {k}: {reason}")
    return {**totals, "share_trained": share, "skipped_when_indexed": whole,
            "skip_reasons": dict(reasons)}


def main(argv: Sequence[str] | None = None) -> int:
    from moejax import config

    p = argparse.ArgumentParser(prog="python -m moejax.data", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pv = sub.add_parser("preview", help="Rendered examples with the trained tokens marked, and totals.")
    pv.add_argument("--config", default=None, help="YAML config (default: built-in defaults).")
    pv.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="Override a config value (repeatable).")
    pv.add_argument("-n", type=int, default=3, help="Examples to print (default 3).")
    pv.add_argument("--limit", type=int, default=2000,
                    help="Conversations the totals cover, spread over the split (0 = all; default 2000).")
    args = p.parse_args(argv)
    if args.n < 0:
        raise UserError(f"-n = {args.n} is out of range: must be >= 0")
    preview(config.load(args.config, args.set), args.n, args.limit)
    return 0

"""Write an OpenHermes-2.5-shaped JSON array (default 1,001,551 ShareGPT conversations, ~2 GB) for
the data-pipeline benchmark in docs/benchmarks.md. Not shipped: generate it where you measure.

    python benchmarks/make_openhermes_like.py /tmp/openhermes_like.json [--records N] [--seed S]

Each record has OpenHermes' keys (most of them null), a `conversations` list of 2-6 turns
(`from` system / human / gpt, `weight` null), and text of random English-like words with some
unicode, code and numbers: lengths drawn so the file averages ~2 KB a record, as the real one does.
"""
from __future__ import annotations

import argparse
import json
import random
import time

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which "
         "but have an they you were her she there been one all we their has would when if so no "
         "what can more out up about into than them only other time new some could these two may "
         "first then do any like my now over such our man me even most made after also did many "
         "def return import print value error naïve café 日本語 Ωmega 42 3.14 1,000 {x} [i] <tag>").split()


def corpus(rng: random.Random, n_chars: int) -> str:
    out, size = [], 0
    while size < n_chars:
        w = rng.choice(WORDS)
        sep = "\n" if rng.random() < 0.03 else " "
        out.append(w + sep)
        size += len(w) + 1
    return "".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out")
    p.add_argument("--records", type=int, default=1_001_551)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--indent", type=int, default=4, help="pretty-print indent (0 = one line)")
    args = p.parse_args()
    rng = random.Random(args.seed)
    text = corpus(rng, 8_000_000)
    indent = args.indent or None

    def piece(mean: int) -> str:
        n = max(1, int(rng.expovariate(1 / mean)))
        start = rng.randrange(0, len(text) - n)
        return text[start:start + n].strip() or "ok"

    t0 = time.time()
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("[")
        for i in range(args.records):
            turns = []
            if rng.random() < 0.3:
                turns.append({"from": "system", "value": piece(100), "weight": None})
            for _ in range(rng.choice((1, 1, 1, 2, 3))):
                turns.append({"from": "human", "value": piece(300), "weight": None})
                turns.append({"from": "gpt", "value": piece(600), "weight": None})
            record = {"custom_instruction": None, "topic": None, "model_name": None, "model": None,
                      "skip_prompt_formatting": False, "category": rng.choice(("orca", "coding", "general")),
                      "conversations": turns, "views": None, "source": "synthetic", "title": None,
                      "avatarUrl": None, "idx": None, "hash": None, "id": None, "language": None,
                      "system_prompt": None}
            if i:
                f.write(",")
            f.write("\n" if indent else "")
            f.write(json.dumps(record, indent=indent, ensure_ascii=False))
        f.write("\n]\n")
    print(f"wrote {args.records} records to {args.out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()

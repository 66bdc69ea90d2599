"""Evaluation: validation loss, and exact-match accuracy of greedy answers per domain."""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable

import numpy as np
from flax import nnx

from moejax.data.example import Example
from moejax.decode import generate


def held_out_questions(source, per_domain: int, scan_limit: int = 20000) -> list[Example]:
    """The first `per_domain` examples of each domain (that end with an assistant answer)."""
    picked: dict[str, list[Example]] = defaultdict(list)
    for i in range(min(len(source), scan_limit)):
        ex = source[i]
        if ex.turns and ex.turns[-1][0] == "assistant" and len(picked[ex.domain]) < per_domain:
            picked[ex.domain].append(ex)
    return [ex for exs in picked.values() for ex in exs]


def normalise(text: str) -> str:
    return " ".join(text.split())


def exact_match(model: nnx.Module, tokenizer, questions: Iterable[Example], max_new: int = 24,
                ) -> dict[str, float]:
    """Greedy answers compared, whitespace-normalised, with the reference answers. Returns
    `eval_exact_match` overall and `eval_exact_match/<domain>` per domain."""
    questions = list(questions)
    if not questions:
        return {}
    prompts, answers = [], []
    for ex in questions:
        prompt, answer = ex.split_answer()
        prompts.append(tokenizer.encode_prompt(prompt))
        answers.append(answer)
    outs = generate(model, prompts, max_new=max_new, stop_ids=list(tokenizer.stop_ids),
                    pad_id=tokenizer.pad_id)
    hits: dict[str, list[bool]] = defaultdict(list)
    for ex, out, answer in zip(questions, outs, answers):
        ids = [t for t in out if t not in tokenizer.stop_ids]
        hits[ex.domain or "all"].append(normalise(tokenizer.decode(ids)) == normalise(answer))
    result: dict[str, Any] = {"eval_exact_match": float(np.mean([h for v in hits.values() for h in v]))}
    for domain, v in sorted(hits.items()):
        result[f"eval_exact_match/{domain}"] = float(np.mean(v))
    return result

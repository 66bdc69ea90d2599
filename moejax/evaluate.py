"""Evaluation: validation loss, and exact-match accuracy of greedy answers per domain.

As a command, `python -m moejax.evaluate --workdir RUN [--json]` measures a run's latest checkpoint
the way training's eval does (same batches, same questions); with `--lm-eval-tasks` it runs
lm-evaluation-harness tasks through the moejax adapter (moejax.lm_eval_adapter, extra `moejax[eval]`).
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from typing import Any, Iterable

import jax
import numpy as np
from flax import nnx

from moejax import parallel
from moejax.data.example import Example
from moejax.data.pipeline import make_packer
from moejax.decode import generate
from moejax.errors import run_cli

EVAL_BATCHES = 4


def validation_batches(cfg, source, tokenizer, n: int = EVAL_BATCHES) -> list[dict[str, np.ndarray]]:
    """The first `n` packed batches of the eval split (this process's shard), as training uses."""
    packer = make_packer(cfg, source, tokenizer, shard_index=jax.process_index(),
                         shard_count=jax.process_count(), workers=0)
    return [next(packer) for _ in range(n)]


def validation_loss(eval_step, params, batches, mesh=None) -> float:
    """Mean next-token cross-entropy over the target positions of `batches` (`losses.make_eval_step`)."""
    sums = [jax.device_get(eval_step(params, parallel.put_batch(b, mesh))) for b in batches]
    return float(sum(s for s, _ in sums) / max(sum(c for _, c in sums), 1.0))


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


def evaluate_run(workdir: str) -> dict[str, float]:
    """`eval_loss` and exact match (overall and per domain) of a run's latest checkpoint."""
    from moejax.data import open_source
    from moejax.losses import make_eval_step
    from moejax.runs import load_model, load_tokenizer

    cfg, model = load_model(workdir)
    tokenizer = load_tokenizer(cfg, workdir)
    source = open_source(cfg.data.source, cfg.data.eval_split, cfg.data)
    graphdef, params = nnx.split(model)
    mesh = parallel.make_mesh(cfg)
    with parallel.use_mesh(mesh):
        params = jax.device_put(params, parallel.state_shardings(params, mesh))
        out = {"eval_loss": validation_loss(make_eval_step(graphdef), params,
                                            validation_batches(cfg, source, tokenizer), mesh)}
    out.update(exact_match(model, tokenizer, held_out_questions(source, cfg.data.eval_questions)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moejax.evaluate", description=__doc__)
    p.add_argument("--workdir", required=True, help="run directory (train.workdir)")
    p.add_argument("--json", action="store_true", help="last stdout line: the metrics as one JSON object")
    p.add_argument("--lm-eval-tasks", help="comma-separated lm-evaluation-harness tasks (moejax[eval])")
    p.add_argument("--include-path", help="directory of extra lm-eval task YAMLs")
    p.add_argument("--limit", type=float, help="lm-eval: at most this many examples per task")
    p.add_argument("--num-fewshot", type=int, help="lm-eval: few-shot examples per prompt")
    p.add_argument("--apply-chat-template", action="store_true", help="lm-eval: render with the chat template")
    p.add_argument("--output-path", help="lm-eval: where its results (and samples) JSON files go")
    p.add_argument("--log-samples", action="store_true", help="lm-eval: also write per-sample files")
    p.add_argument("--batch-size", type=int, default=16, help="lm-eval: requests per forward pass")
    args = p.parse_args(argv)
    if args.lm_eval_tasks:
        from moejax.lm_eval_adapter import require_lm_eval, run_lm_eval

        require_lm_eval()  # before any run is loaded: a missing extra is the first thing to say
        metrics = run_lm_eval(args.workdir, [t for t in args.lm_eval_tasks.split(",") if t],
                              include_path=args.include_path, limit=args.limit, num_fewshot=args.num_fewshot,
                              apply_chat_template=args.apply_chat_template, output_path=args.output_path,
                              log_samples=args.log_samples, batch_size=args.batch_size)
    else:
        metrics = evaluate_run(args.workdir)
    for key, value in metrics.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}", flush=True)
    if args.json:
        print(json.dumps(metrics, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)

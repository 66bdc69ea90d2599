"""`python -m moejax.generate --workdir RUN --prompt "..." [--system S] [--json]`: answer prompts with a
trained checkpoint, rendered with the run's chat template (generation prompt on) and stopped at the
tokenizer's eos / end-of-turn ids."""
from __future__ import annotations

import argparse
import json

from moejax.decode import generate
from moejax.errors import UserError, run_cli


def chat_messages(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moejax.generate", description=__doc__)
    p.add_argument("--workdir", required=True, help="run directory (train.workdir)")
    p.add_argument("--prompt", action="append", required=True,
                   help="a user message (repeatable: each is answered on its own)")
    p.add_argument("--system", default=None, help="a system message put before each prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = all)")
    p.add_argument("--min-new-tokens", type=int, default=0, help="no stop token before this many")
    p.add_argument("--no-kv-cache", action="store_true",
                   help="re-run the whole buffer per token (the reference path) instead of the KV cache")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per prompt: prompt, completion, token_ids (the new ids)")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1 or args.temperature < 0:
        raise UserError("--max-new-tokens must be >= 1 and --temperature >= 0")
    if args.top_k < 0 or not 0 < args.top_p <= 1 or not 0 <= args.min_new_tokens <= args.max_new_tokens:
        raise UserError("--top-k must be >= 0, --top-p in (0, 1], --min-new-tokens in [0, --max-new-tokens]")
    from moejax.runs import restore_model  # heavy imports after argument checks

    _, model, tok = restore_model(args.workdir)
    prompts = [tok.encode_prompt(chat_messages(text, args.system)) for text in args.prompt]
    stops = list(tok.stop_ids)
    outs = generate(model, prompts, max_new=args.max_new_tokens, stop_ids=stops,
                    pad_id=tok.pad_id, temperature=args.temperature, seed=args.seed, top_k=args.top_k,
                    top_p=args.top_p, min_new=args.min_new_tokens, kv_cache=not args.no_kv_cache)
    for text, out in zip(args.prompt, outs):
        answer = tok.decode([t for t in out if t not in stops])
        if args.json:
            print(json.dumps({"prompt": text, "completion": answer, "token_ids": [int(t) for t in out]},
                             ensure_ascii=False), flush=True)
        else:
            print(f"> {text}\n{answer}", flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)

"""Reference check (run by hand with transformers; not a test): the tiny Llama chat checkpoint goes
through import-hf (no --tokenizer), `convert upcycle` to 4 experts (top-2), a short SFT on an
OpenHermes-shaped JSON array (`json:` source: one pretty-printed array of ShareGPT records with
`weight: null` keys and system turns), export-hf (a Mixtral checkpoint); transformers' AutoTokenizer
and AutoModelForCausalLM on the export must give the same greedy chat token ids as
`moejax.generate --json`.

    /work/hfvenv/bin/python tests/check_export_with_transformers.py --moejax-python /work/venv/bin/python
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = os.path.join(REPO, "tests", "fixtures", "tokenizers", "tiny_llama_chat")
PROMPTS = ["What is 2 + 2?", "Name a color.", "Say hello in French."]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--moejax-python", default="/work/venv/bin/python")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    root = tempfile.mkdtemp(prefix="moejax-export-check-")
    data = os.path.join(root, "openhermes.json")  # OpenHermes-2.5's shape: one JSON array
    records = []
    for i in range(64):
        turns = [{"from": "system", "value": "You are a terse calculator.", "weight": None}] if i % 3 == 0 else []
        turns += [{"from": "human", "value": f"What is {i} + 1?", "weight": None},
                  {"from": "gpt", "value": f"{i} + 1 = {i + 1}.", "weight": None}]
        records.append({"conversations": turns, "source": "synthetic", "category": None})
    with open(data, "w", encoding="utf-8") as f:
        json.dump(records, f, indent=4)
    dense, run, out = os.path.join(root, "dense"), os.path.join(root, "run"), os.path.join(root, "hf")
    sets = [f"data.source=json:{data}", "data.seq_len=64", "data.eval_questions=0", "train.batch_size=4",
            f"train.steps={args.steps}", "train.warmup_steps=0", "train.lr=3e-3", "train.log_every=10",
            "train.eval_every=1000"]
    py = args.moejax_python

    def sh(*cmd):
        subprocess.run([py, *cmd], check=True, env=env, cwd=REPO)

    sh("-m", "moejax.convert", "import-hf", CKPT, dense, *[a for s in sets for a in ("--set", s)])
    sh("-m", "moejax.convert", "upcycle", dense, run, "--experts", "4", "--top-k", "2")
    sh("-m", "moejax.train", "--config", os.path.join(run, "config.yaml"))
    sh("-m", "moejax.convert", "export-hf", run, out)
    gen = subprocess.run([py, "-m", "moejax.generate", "--workdir", run, "--max-new-tokens", "16", "--json",
                          *[a for q in PROMPTS for a in ("--prompt", q)]], check=True, env=env, cwd=REPO,
                         capture_output=True, text=True).stdout
    ours = [json.loads(line) for line in gen.strip().splitlines()]
    print("exported model_type:", json.load(open(os.path.join(out, "config.json")))["model_type"])
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    same = 0
    for q, o in zip(PROMPTS, ours):
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():  # an explicit attention mask: no prompt token is taken for padding
            g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                               eos_token_id=eos)
        theirs = g[0, ids.shape[1]:].tolist()
        same += theirs == o["token_ids"]
        print(json.dumps({"prompt": q, "moejax": o["token_ids"], "transformers": theirs,
                          "completion": o["completion"], "equal": theirs == o["token_ids"]}))
    print(f"transformers {transformers.__version__}, torch {torch.__version__}: {same}/{len(PROMPTS)} prompts "
          f"give identical greedy ids after upcycling to 4 experts and {args.steps} SFT steps on a JSON array")
    return 0 if same == len(PROMPTS) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Reference check (run by hand with transformers; not a test): the tiny Llama chat checkpoint goes
through import-hf (no --tokenizer), a short SFT, export-hf; transformers' AutoTokenizer and
AutoModelForCausalLM on the export must give the same greedy chat token ids as `moejax.generate --json`.

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
    data = os.path.join(root, "chat.json")  # an OpenHermes-shaped ShareGPT file
    with open(data, "w", encoding="utf-8") as f:
        for i in range(64):
            f.write(json.dumps({"conversations": [{"from": "human", "value": f"What is {i} + 1?"},
                                                  {"from": "gpt", "value": f"{i} + 1 = {i + 1}."}]}) + "\n")
    run, out = os.path.join(root, "run"), os.path.join(root, "hf")
    sets = [f"data.source=jsonl:{data}", "data.seq_len=64", "data.eval_questions=0", "train.batch_size=4",
            f"train.steps={args.steps}", "train.warmup_steps=0", "train.lr=3e-3", "train.log_every=10",
            "train.eval_every=1000"]
    py = args.moejax_python

    def sh(*cmd):
        subprocess.run([py, *cmd], check=True, env=env, cwd=REPO)

    sh("-m", "moejax.convert", "import-hf", CKPT, run, *[a for s in sets for a in ("--set", s)])
    sh("-m", "moejax.train", "--config", os.path.join(run, "config.yaml"))
    sh("-m", "moejax.convert", "export-hf", run, out)
    gen = subprocess.run([py, "-m", "moejax.generate", "--workdir", run, "--max-new-tokens", "16", "--json",
                          *[a for q in PROMPTS for a in ("--prompt", q)]], check=True, env=env, cwd=REPO,
                         capture_output=True, text=True).stdout
    ours = [json.loads(line) for line in gen.strip().splitlines()]
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    same = 0
    for q, o in zip(PROMPTS, ours):
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            g = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id or 0)
        theirs = g[0, ids.shape[1]:].tolist()
        same += theirs == o["token_ids"]
        print(json.dumps({"prompt": q, "moejax": o["token_ids"], "transformers": theirs,
                          "completion": o["completion"], "equal": theirs == o["token_ids"]}))
    print(f"transformers {transformers.__version__}, torch {torch.__version__}: {same}/{len(PROMPTS)} prompts "
          f"give identical greedy ids after {args.steps} SFT steps")
    return 0 if same == len(PROMPTS) else 1


if __name__ == "__main__":
    sys.exit(main())

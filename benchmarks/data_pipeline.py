"""The data pipeline at OpenHermes scale (docs/benchmarks.md, "Data pipeline"): for the quickstart
model on a 1M-conversation JSON array, the cold start (no index cached) and the warm start (index
cached) to 3 trained steps, each run's peak RSS, and the pipeline's tokens/s against the training
step's consumption.

    python benchmarks/make_openhermes_like.py /tmp/openhermes_like.json
    python benchmarks/data_pipeline.py /tmp/openhermes_like.json [--out DIR] [--json]

Each start is a fresh `python -m moejax.train` process (tokenizer trained into a new workdir,
compile, 3 steps, a checkpoint); its wall time is until it exits, its RSS from wait4().
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_sets(data: str, cache: str, workdir: str) -> list[str]:
    sets = [f"data.source=json:{data}", f"data.cache_dir={cache}", f"train.workdir={workdir}",
            "train.steps=3", "train.log_every=1", "train.save_every=1000", "train.eval_every=1000",
            "data.eval_questions=0"]
    return [a for s in sets for a in ("--set", s)]


def timed_run(argv: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, stdout) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(argv)}\n{out[-3000:]}")
    return wall, usage.ru_maxrss * 1024, out


PIPELINE = r'''
import json, sys, time
from moejax import config
from moejax.data import open_source
from moejax.data.pipeline import make_packer
from moejax.tokenizer import Tokenizer
cfg = config.load("configs/quickstart.yaml", sys.argv[1:-2])
tok = Tokenizer.load(sys.argv[-2])
packer = make_packer(cfg, open_source(cfg.data.source, "train", cfg.data), tok)
next(packer)
t0, tokens, n = time.perf_counter(), 0, int(sys.argv[-1])
for _ in range(n):
    next(packer)
    tokens += packer.tokens_per_batch
dt = time.perf_counter() - t0
print(json.dumps({"batches": n, "tokens": tokens, "seconds": dt, "tokens_per_sec": tokens / dt,
                  "examples_per_sec": packer.examples_seen / dt}))
'''


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("data", help="the JSON array (benchmarks/make_openhermes_like.py)")
    p.add_argument("--out", default=None, help="scratch directory (default: a new temporary one)")
    p.add_argument("--batches", type=int, default=200, help="batches timed for the pipeline rate")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="moejax-data-bench-")
    cache = os.path.join(out, "cache")
    shutil.rmtree(cache, ignore_errors=True)
    train = [sys.executable, "-m", "moejax.train", "--config", "configs/quickstart.yaml"]
    res: dict[str, object] = {"records_file_bytes": os.path.getsize(args.data)}
    for phase in ("cold", "warm"):
        workdir = os.path.join(out, phase)
        shutil.rmtree(workdir, ignore_errors=True)
        wall, rss, log = timed_run(train + train_sets(args.data, cache, workdir))
        res[f"{phase}_start_s"], res[f"{phase}_peak_rss_gib"] = round(wall, 1), round(rss / 2**30, 3)
        print(f"{phase}: {wall:.1f} s to 3 trained steps, peak RSS {rss / 2**30:.2f} GiB", flush=True)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if '"tokens_per_sec"' in line]
        res[f"{phase}_train_tokens_per_sec"] = round(rows[-1]["tokens_per_sec"], 1)
    sets = train_sets(args.data, cache, os.path.join(out, "cold"))
    wall, rss, log = timed_run([sys.executable, "-c", PIPELINE, *sets[1::2],
                                os.path.join(out, "cold", "tokenizer.model"), str(args.batches)])
    pipe = json.loads(log.strip().splitlines()[-1])
    res["pipeline_tokens_per_sec"] = round(pipe["tokens_per_sec"], 1)
    res["pipeline_vs_training"] = round(pipe["tokens_per_sec"] / res["warm_train_tokens_per_sec"], 1)
    print(f"pipeline: {pipe['tokens_per_sec']:,.0f} tokens/s ({pipe['examples_per_sec']:,.0f} "
          f"conversations/s); training consumes {res['warm_train_tokens_per_sec']:,.0f} tokens/s: "
          f"{res['pipeline_vs_training']}x")
    if args.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()

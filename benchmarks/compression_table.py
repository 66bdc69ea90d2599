"""The tables of docs/compression.md: expert pruning / merging of a trained 8-expert model, and
distillation, measured on the embedded tasks.

    python benchmarks/compression_table.py --part compress   # base run + 8 -> 6 / 4 variants
    python benchmarks/compression_table.py --part distill    # student with vs without KD, 2 seeds
    python benchmarks/compression_table.py --part table      # markdown from the saved results

Base: configs/quickstart.yaml with --base-steps steps. Each compressed run is evaluated as written,
then after a short recovery fine-tune (--recover steps). Evaluation: eval loss over EVAL_BATCHES
packed validation batches and exact match of greedy answers on --questions held-out questions per
domain (moejax.evaluate). Results land in OUT/results.json (rerunning a part skips finished rows).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from moejax import config as config_lib  # noqa: E402
from moejax import flops as flops_lib  # noqa: E402

EVAL_BATCHES = 8
RANDOM_SEEDS = (0, 1, 2)
QUICKSTART = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                          "quickstart.yaml")


def load_results(out):
    path = os.path.join(out, "results.json")
    return json.load(open(path)) if os.path.exists(path) else {}


def save_results(out, res):
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(res, f, indent=1)


def evaluate(workdir: str, questions_per_domain: int) -> dict:
    """eval loss and exact match of a run directory's latest checkpoint."""
    from moejax.data import open_source
    from moejax.data.packing import Packer
    from moejax.evaluate import exact_match, held_out_questions
    from moejax.runs import restore_model
    from moejax.train import make_eval_step

    cfg, model, tok = restore_model(workdir)
    src = open_source(cfg.data.source, cfg.data.eval_split, cfg.data)
    packer = Packer(src, tok, cfg.data.seq_len, 8, 0)  # fixed batches: the same for every run
    graphdef, params = nnx.split(model)
    step = make_eval_step(graphdef)
    sums = [jax.device_get(step(params, next(packer))) for _ in range(EVAL_BATCHES)]
    loss = float(sum(s for s, _ in sums) / sum(c for _, c in sums))
    em = exact_match(model, tok, held_out_questions(src, questions_per_domain))
    n_params = int(sum(x.size for x in jax.tree.leaves(params)))
    return {"eval_loss": loss, "exact_match": em.get("eval_exact_match", 0.0), "params": n_params,
            "train_flops_per_token": flops_lib.train_flops_per_token(cfg.model, cfg.data.seq_len),
            "active_matmul_params": flops_lib.matmul_params_per_token(cfg.model)}


def train_run(overrides: list[str], config: str = QUICKSTART) -> None:
    from moejax.train import train

    train(config_lib.load(config, overrides))


def finetune(workdir: str, steps: int) -> None:
    train_run([f"train.steps={steps}", "train.warmup_steps=10", "train.lr=1e-3",
               f"train.eval_every={steps}", f"train.save_every={steps}", "data.eval_questions=1",
               f"train.log_every={steps}"], os.path.join(workdir, "config.yaml"))


def part_compress(args, res):
    from moejax.compress.__main__ import main as compress

    base = os.path.join(args.out, "base")
    if "base" not in res:
        t = time.time()
        train_run([f"train.steps={args.base_steps}", f"train.workdir={base}",
                   f"train.eval_every={args.base_steps}", f"train.save_every={args.base_steps}",
                   "data.eval_questions=1"])
        res["base"] = {**evaluate(base, args.questions), "train_s": time.time() - t}
        save_results(args.out, res)
    variants = []
    for k in (6, 4):  # the usage-vs-random comparison first, then NAEE and the merges
        variants.append((f"prune-usage-{k}", ["prune", "--keep", str(k), "--method", "usage"]))
        # Several random draws: "usage beats random" is judged against all of them, not one draw.
        variants += [(f"prune-random{s or ''}-{k}", ["prune", "--keep", str(k), "--method", "random",
                                                     "--seed", str(s)]) for s in RANDOM_SEEDS]
        variants.append((f"prune-reconstruction-{k}", ["prune", "--keep", str(k), "--method", "reconstruction"]))
        variants += [(f"merge-{m}-{k}", ["merge", "--experts", str(k), "--method", m]) for m in ("mcsmoe", "average")]
    for name, cmd in variants:
        if name in res and "recovered" in res[name]:
            continue
        wd = os.path.join(args.out, name)
        t = time.time()
        if not os.path.exists(os.path.join(wd, "config.yaml")):
            compress([cmd[0], base, wd, *cmd[1:], "--tokens", str(args.tokens)])
        row = {"after": evaluate(wd, args.questions), "compress_s": time.time() - t}
        info = json.load(open(os.path.join(wd, "compress.json")))
        row["distinct_params"] = info.get("distinct_params_after", info.get("params_after"))
        finetune(wd, args.recover)
        row["recovered"] = evaluate(wd, args.questions)
        res[name] = row
        save_results(args.out, res)
        print(name, json.dumps(row), flush=True)


def part_distill(args, res):
    base = os.path.join(args.out, "base")
    student = ["model.n_layers=2", "model.moe.num_experts=4", f"train.steps={args.student_steps}",
               f"train.eval_every={args.student_steps}", f"train.save_every={args.student_steps}",
               "data.eval_questions=1", f"train.log_every={args.student_steps // 4}"]
    for seed in (0, 1):
        for kd in (False, True):
            name = f"distill-{'kd' if kd else 'plain'}-seed{seed}"
            if name in res:
                continue
            wd = os.path.join(args.out, name)
            extra = [f"train.distill.teacher={base}", "train.distill.alpha=0.5",
                     "train.distill.temperature=1.0",
                     f"train.distill.stop_step={int(args.student_steps * 0.8)}"] if kd else []
            t = time.time()
            train_run(student + extra + [f"train.seed={seed}", f"train.workdir={wd}",
                                         f"data.tokenizer={os.path.join(base, 'tokenizer.model')}"])
            res[name] = {**evaluate(wd, args.questions), "train_s": time.time() - t}
            save_results(args.out, res)
            print(name, json.dumps(res[name]), flush=True)


def part_table(args, res):
    b = res["base"]
    lines = ["| model | experts kept | params (distinct) | eval loss | exact match | "
             f"after {args.recover}-step recovery: eval loss | exact match |",
             "|---|---|---|---|---|---|---|",
             f"| base (8 experts, {args.base_steps} steps) | 8 | {b['params'] / 1e6:.3f}M | "
             f"{b['eval_loss']:.4f} | {b['exact_match']:.3f} | | |"]
    for k in (6, 4):
        randoms = [f"prune-random-{k}"] + [f"prune-random{s}-{k}" for s in RANDOM_SEEDS[1:]]
        for name in [f"prune-{m}-{k}" for m in ("usage", "reconstruction")] + randoms + \
                [f"merge-{m}-{k}" for m in ("mcsmoe", "average")]:
            if name not in res:
                continue
            r = res[name]
            a, c = r["after"], r.get("recovered", {})
            saved = 1 - r["distinct_params"] / b["params"]
            label = name.rsplit('-', 1)[0]
            if label.startswith("prune-random"):
                label = f"prune-random (seed {label[len('prune-random'):] or 0})"
            lines.append(f"| {label} | {k} | {r['distinct_params'] / 1e6:.3f}M "
                         f"(-{100 * saved:.1f}%) | {a['eval_loss']:.4f} | {a['exact_match']:.3f} | "
                         f"{c.get('eval_loss', float('nan')):.4f} | {c.get('exact_match', float('nan')):.3f} |")
    lines += ["", "| student (2 layers, 4 experts) | seed | params | eval loss | exact match |",
              "|---|---|---|---|---|"]
    for seed in (0, 1):
        for kd in ("plain", "kd"):
            r = res.get(f"distill-{kd}-seed{seed}")
            if r:
                lines.append(f"| {'with KD' if kd == 'kd' else 'without KD'} | {seed} | "
                             f"{r['params'] / 1e6:.3f}M | {r['eval_loss']:.4f} | {r['exact_match']:.3f} |")
    lines.append(f"\nFLOPs per token (train, matmuls): base {b['train_flops_per_token'] / 1e6:.2f}M")
    for name in ("prune-usage-6", "prune-usage-4", "distill-kd-seed0"):
        if name in res:
            r = res[name].get("after", res[name])
            lines.append(f"- {name}: {r['train_flops_per_token'] / 1e6:.2f}M")
    print("\n".join(lines))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["compress", "distill", "table"], required=True)
    p.add_argument("--out", default="runs/compression")
    p.add_argument("--base-steps", type=int, default=600)
    p.add_argument("--recover", type=int, default=100)
    p.add_argument("--student-steps", type=int, default=300)
    p.add_argument("--tokens", type=int, default=8192, help="calibration tokens")
    p.add_argument("--questions", type=int, default=32, help="held-out questions per domain")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    res = load_results(args.out)
    {"compress": part_compress, "distill": part_distill, "table": part_table}[args.part](args, res)


if __name__ == "__main__":
    main()

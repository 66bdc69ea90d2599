"""Plot a run's loss and expert load from its metrics.jsonl (the README's picture).

    python scripts/plot_quickstart.py runs/quickstart --out docs/images/quickstart.png

Three panels: the training and validation loss; per MoE layer, the busiest expert's share of the
routed slots over the uniform share 1/E (1 = balanced) at every logged step; and the last logged
step's load of every expert of every layer, against uniform.
"""
from __future__ import annotations

import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moejax.metrics import read_metrics  # noqa: E402


def plot(workdir: str, out: str) -> None:
    records = read_metrics(workdir)
    logged = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    if not logged:
        raise SystemExit(f"error: {workdir}/metrics.jsonl has no logged training step")
    steps = np.array([r["step"] for r in logged])
    load_sle = np.array([r["expert_load"] for r in logged])  # [step, MoE layer, expert] fractions
    num_experts = load_sle.shape[2]
    rel_sle = load_sle * num_experts

    fig, (ax0, ax1, ax2) = plt.subplots(1, 3, figsize=(13, 3.6), gridspec_kw={"width_ratios": [1, 1, 1.1]})
    ax0.plot(steps, [r["loss"] for r in logged], label="train")
    ax0.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o", label="validation")
    ax0.set(xlabel="step", ylabel="LM loss (nats)", title="loss")
    ax0.legend()
    for layer in range(rel_sle.shape[1]):
        ax1.plot(steps, rel_sle[:, layer].max(axis=1), label=f"layer {layer}")
    ax1.axhline(1.0, color="gray", ls=":")
    ax1.set(xlabel="step", ylabel="busiest expert / uniform", title="load balance (1 = balanced)")
    ax1.legend(fontsize=8)
    last = rel_sle[-1]
    span = max(0.5, float(np.abs(last - 1).max()))
    im = ax2.imshow(last, cmap="RdBu_r", vmin=1 - span, vmax=1 + span, aspect="auto")
    ax2.set(xlabel="expert", ylabel="MoE layer", xticks=range(num_experts), yticks=range(last.shape[0]),
            title=f"expert load / uniform, step {steps[-1]}")
    fig.colorbar(im, ax=ax2)
    fig.tight_layout()
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.savefig(out, dpi=80)
    print(f"wrote {out} ({os.path.getsize(out) / 1024:.0f} KB)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir", help="run directory (train.workdir) with metrics.jsonl")
    p.add_argument("--out", default="docs/images/quickstart.png")
    args = p.parse_args()
    plot(args.workdir, args.out)


if __name__ == "__main__":
    main()

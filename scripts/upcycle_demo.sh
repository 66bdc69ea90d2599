#!/usr/bin/env bash
# Dense -> MoE demo on the embedded data (docs/dense_to_moe.md): train a small dense model, upcycle it
# into 8 experts (top-2), fine-tune the MoE, and compare the first MoE losses with the dense model's
# last ones. Usage: bash scripts/upcycle_demo.sh [RUNS_DIR]   (about 5 minutes on a 2-core CPU)
set -euo pipefail
runs=${1:-runs/upcycle_demo}
rm -rf "$runs"
common=(--set model.moe.num_experts=0 --set model.d_ff=256 --set train.eval_every=1000
        --set data.eval_questions=0 --set train.log_every=20 --set train.save_every=1000)
python -m moejax.train --config configs/quickstart.yaml "${common[@]}" \
    --set train.steps=300 --set train.workdir="$runs/dense"
python -m moejax.convert upcycle "$runs/dense" "$runs/moe" --experts 8 --top-k 2 --noise 0.01 \
    --set train.steps=100 --set train.warmup_steps=10 --set train.lr=1e-3 --set train.log_every=1
python -m moejax.train --config "$runs/moe/config.yaml" --set train.log_every=1
python - "$runs" <<'PY'
import json, sys
runs = sys.argv[1]
rows = lambda p: [json.loads(l) for l in open(p) if '"loss"' in l]
dense, moe = rows(f"{runs}/dense/metrics.jsonl"), rows(f"{runs}/moe/metrics.jsonl")
print(f"dense model, last logged loss (step {dense[-1]['step']}): {dense[-1]['loss']:.3f}")
print("upcycled MoE, first losses: " + ", ".join(f"{r['loss']:.3f}" for r in moe[:5]))
print(f"upcycled MoE, step {moe[-1]['step']}: {moe[-1]['loss']:.3f}")
PY

#!/usr/bin/env bash
# Whole `python -m moejax.generate` command, 16 prompts x 256 new tokens (--min-new-tokens 256 so
# every answer is 256 tokens long), with the KV cache and with --no-kv-cache, on a quickstart run:
#   python -m moejax.train --config configs/quickstart.yaml --set train.steps=20 --set train.workdir=RUN
#   bash benchmarks/generate_speed.sh RUN
set -euo pipefail
RUN=${1:?run directory}
args=(--workdir "$RUN" --max-new-tokens 256 --min-new-tokens 256)
for i in $(seq 1 16); do args+=(--prompt "What is $i + $((i * 3))?"); done
for mode in cache no-cache; do
  extra=(); [ "$mode" = no-cache ] && extra=(--no-kv-cache)
  start=$(date +%s.%N)
  python -m moejax.generate "${args[@]}" "${extra[@]}" > "/tmp/generate_speed_$mode.txt"
  end=$(date +%s.%N)
  echo "$mode: $(echo "$end - $start" | bc) s"
done
cmp /tmp/generate_speed_cache.txt /tmp/generate_speed_no-cache.txt && echo "same answers"

#!/usr/bin/env bash
# Run one command on every worker of a Cloud TPU VM, in the moejax checkout. See --help and docs/tpu.md.
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

LOG=
VALUE_FLAGS="$VALUE_FLAGS --log:LOG --remote-dir:REMOTE_DIR"
TAKES_COMMAND=1

usage() {
  cat <<USAGE
Usage: $SCRIPT [flags] -- COMMAND [ARGS...]

Run COMMAND on all workers of the TPU VM NAME at once (gcloud compute tpus tpu-vm ssh
--worker=all), in the moejax checkout DIR with its virtual environment DIR/.venv active
(tpu/setup.sh made both). The workers' output streams to your terminal; the exit status is
gcloud's. Every worker runs the same command: on a multi-host TPU (v4-32, v5p-64, ...) the
training program starts JAX's multi-host runtime itself.

Flags:
  --log FILE          also append the output to FILE (on this machine)
$REMOTE_DIR_HELP
$COMMON_HELP

Example:
  $SCRIPT -- python -m moejax.selfcheck      # first: does every kernel work here, and how fast
  $SCRIPT --log logs/mixtral_tiny.log -- python -m moejax.train --config configs/mixtral_tiny_tpu_v5e_8.yaml
USAGE
}

parse_args "$@"
require project zone name
[ ${#ARGS[@]} -gt 0 ] ||
  die "missing the command to run: $SCRIPT [flags] -- python -m moejax.train --config CONFIG"
need_gcloud

command_line=$(printf ' %q' "${ARGS[@]}")
remote="cd $(remote_dir_quoted) && . .venv/bin/activate && export PYTHONUNBUFFERED=1 MOEJAX_DISTRIBUTED=1 &&$command_line"
if [ -n "$LOG" ]; then
  mkdir -p -- "$(dirname -- "$LOG")"
  ssh_all "$remote" 2>&1 | tee -a -- "$LOG"
else
  ssh_all "$remote"
fi

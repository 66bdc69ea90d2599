#!/usr/bin/env bash
# Copy a run directory from worker 0 of a Cloud TPU VM to this machine. See --help and docs/tpu.md.
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

WORKDIR=
TO=.
VALUE_FLAGS="$VALUE_FLAGS --workdir:WORKDIR --to:TO --remote-dir:REMOTE_DIR"

usage() {
  cat <<USAGE
Usage: $SCRIPT --workdir WORKDIR [--to DIR] [flags]

Copy the run directory WORKDIR (the run's train.workdir: relative to the moejax checkout on the
workers, or absolute) from worker 0 of the TPU VM NAME into the local directory DIR (runs/X
lands in DIR/X):
  gcloud compute tpus tpu-vm scp --recurse --worker=0 NAME:DIR_ON_WORKER/WORKDIR DIR ...
Worker 0 runs process 0, which writes metrics.jsonl, TensorBoard files and config.yaml.

Flags:
  --workdir WORKDIR   the run directory to copy, e.g. runs/mixtral_tiny (required)
  --to DIR            local directory to copy into, created if missing (default: .)
$REMOTE_DIR_HELP
$COMMON_HELP

Example:
  $SCRIPT --workdir runs/mixtral_tiny --to results
USAGE
}

parse_args "$@"
require project zone name
[ -n "$WORKDIR" ] || die "missing the run directory: pass --workdir WORKDIR (the run's train.workdir, e.g. runs/mixtral_tiny)"
need_gcloud

case $WORKDIR in
  /*) source_dir=$WORKDIR ;;
  *) source_dir=${REMOTE_DIR#\~/}/$WORKDIR ;;
esac
source_dir=${source_dir%/}
if [ "$DRY_RUN" = 0 ]; then
  mkdir -p -- "$TO"
fi
gc compute tpus tpu-vm scp "$NAME:$source_dir" "$TO" --recurse --worker=0 --zone="$ZONE" --project="$PROJECT"
if [ "$DRY_RUN" = 0 ]; then
  note "copied into ${TO%/}/$(basename -- "$source_dir")"
fi

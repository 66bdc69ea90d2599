#!/usr/bin/env bash
# Delete a Cloud TPU VM, or a queued resource with its TPU VM. See --help and docs/tpu.md.
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

QUEUED=0
QUIET=0
SWITCH_FLAGS="$SWITCH_FLAGS --queued:QUEUED --quiet:QUIET"

usage() {
  cat <<USAGE
Usage: $SCRIPT [flags]

Delete the TPU VM NAME (gcloud compute tpus tpu-vm delete NAME ...), or with --queued the
queued resource NAME together with its TPU VM (gcloud compute tpus queued-resources delete
NAME --force ...). Whatever is only on the workers' disks is lost: copy results first
(tpu/copy_results.sh).

Flags:
  --queued            delete the queued resource NAME (made by tpu/create.sh --queued)
  --quiet             do not ask for confirmation (passes --quiet to gcloud)
$COMMON_HELP

Example:
  $SCRIPT --project my-project --zone us-west4-a --name moejax-v5e
USAGE
}

parse_args "$@"
require project zone name
need_gcloud

if [ "$QUEUED" = 1 ]; then
  cmd=(compute tpus queued-resources delete "$NAME" --force)
else
  cmd=(compute tpus tpu-vm delete "$NAME")
fi
cmd+=(--zone="$ZONE" --project="$PROJECT")
if [ "$QUIET" = 1 ]; then
  cmd+=(--quiet)
fi
gc "${cmd[@]}"

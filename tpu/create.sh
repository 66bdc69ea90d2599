#!/usr/bin/env bash
# Create a Cloud TPU VM (or a queued resource that becomes one) for moejax. See --help and docs/tpu.md.
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

QUEUED=0
SPOT=0
VALUE_FLAGS="$VALUE_FLAGS --type:TYPE --runtime:RUNTIME"
SWITCH_FLAGS="$SWITCH_FLAGS --queued:QUEUED --spot:SPOT"

usage() {
  cat <<USAGE
Usage: $SCRIPT [flags]

Create a Cloud TPU VM NAME of accelerator type TYPE:
  gcloud compute tpus tpu-vm create NAME --accelerator-type=TYPE --version=RUNTIME ...
or, with --queued, a queued resource NAME whose TPU VM (node) is also called NAME; it is
created when capacity is available:
  gcloud compute tpus queued-resources create NAME --node-id=NAME --runtime-version=RUNTIME ...

Flags:
  --type TYPE         accelerator type, e.g. v5litepod-8, v4-32, v5p-64, v6e-16
                                                                   [\$MOEJAX_TPU_TYPE]
  --runtime VERSION   TPU software version (default by generation: v2/v3/v4
                      tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite, v5p
                      v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)         [\$MOEJAX_TPU_RUNTIME]
  --queued            create a queued resource instead of the TPU VM directly
  --spot              spot capacity (cheaper; may be preempted at any time)
$COMMON_HELP

Example:
  $SCRIPT --project my-project --zone us-west4-a --name moejax-v5e --type v5litepod-8
USAGE
}

# The TPU software version for JAX of an accelerator type's generation. Source: Google Cloud, "TPU
# software versions", https://cloud.google.com/tpu/docs/runtimes (PyTorch and JAX table: v6e
# v2-alpha-tpuv6e, v5p v2-alpha-tpuv5, v5e v2-alpha-tpuv5-lite, v4 and older tpu-ubuntu2204-base).
default_runtime() {
  case $TYPE in
    v2-* | v3-* | v4-*) RUNTIME=tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) RUNTIME=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
    *) die "no default runtime for accelerator type '$TYPE': pass --runtime VERSION or set MOEJAX_TPU_RUNTIME" ;;
  esac
}

parse_args "$@"
require project zone name type
[ -n "$RUNTIME" ] || default_runtime
need_gcloud

if [ "$QUEUED" = 1 ]; then
  cmd=(compute tpus queued-resources create "$NAME" --node-id="$NAME" --runtime-version="$RUNTIME")
else
  cmd=(compute tpus tpu-vm create "$NAME" --version="$RUNTIME")
fi
cmd+=(--accelerator-type="$TYPE" --zone="$ZONE" --project="$PROJECT")
if [ "$SPOT" = 1 ]; then
  cmd+=(--spot)
fi
gc "${cmd[@]}"

if [ "$QUEUED" = 1 ] && [ "$DRY_RUN" = 0 ]; then
  note "queued: the TPU VM $NAME exists once the queued resource is ACTIVE; check with"
  note "  gcloud compute tpus queued-resources describe $NAME --zone=$ZONE --project=$PROJECT"
fi

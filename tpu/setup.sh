#!/usr/bin/env bash
# Install moejax on every worker of a Cloud TPU VM. See --help and docs/tpu.md.
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

REPO=
VALUE_FLAGS="$VALUE_FLAGS --repo:REPO --remote-dir:REMOTE_DIR"

usage() {
  cat <<USAGE
Usage: $SCRIPT [flags]

Put moejax on every worker of the TPU VM NAME, into DIR (--remote-dir, default ~/moejax), and
install it there: a virtual environment DIR/.venv with Python >= 3.11 (installed with apt when
the image has none) and pip install -e '.[tpu]' (tpu/remote_install.sh, run on each worker).

By default the source files of this local checkout (what git tracks plus untracked files it
does not ignore: no .git, no runs/) are copied to all workers with
  gcloud compute tpus tpu-vm scp --recurse --worker=all ...
over DIR (files there that are not in the copy, e.g. DIR/runs, stay). With --repo, each worker
clones that git repository into DIR instead (or pulls, when DIR is already a clone).
Run it again after changing the code.

Flags:
  --repo URL          git clone URL on the workers instead of copying this checkout
$REMOTE_DIR_HELP
$COMMON_HELP

Example:
  $SCRIPT --project my-project --zone us-west4-a --name moejax-v5e
USAGE
}

# Copy the source files of the local checkout (not .git, virtual environments or runs/) into $1.
stage_checkout() {
  local dest=$1 f top
  mkdir -p -- "$dest"
  if command -v git >/dev/null 2>&1 && git -C "$MOEJAX_ROOT" rev-parse --git-dir >/dev/null 2>&1; then
    git -C "$MOEJAX_ROOT" ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' f; do
        top=${f%%/*}
        case $f in runs/* | __pycache__/* | */__pycache__/*) continue ;; esac
        if [ "$top" != "$f" ] && [ -e "$MOEJAX_ROOT/$top/pyvenv.cfg" ]; then continue; fi  # a venv
        if [ -e "$MOEJAX_ROOT/$f" ]; then printf '%s\0' "$f"; fi  # not deleted since git add
      done |
      tar -C "$MOEJAX_ROOT" --null -T - -cf - | tar -C "$dest" -xf -
  else
    tar -C "$MOEJAX_ROOT" --exclude=.git --exclude=.venv --exclude=venv --exclude=runs \
      --exclude=__pycache__ -cf - . | tar -C "$dest" -xf -
  fi
}

parse_args "$@"
require project zone name
need_gcloud

dir=$(remote_dir_quoted)
install="cd $dir && bash tpu/remote_install.sh"
if [ -n "$REPO" ]; then
  repo=$(printf '%q' "$REPO")
  ssh_all "set -e; if [ -d $dir/.git ]; then git -C $dir pull --ff-only; else git clone $repo $dir; fi; $install"
else
  tmp=$(mktemp -d)
  trap 'rm -rf -- "$tmp"' EXIT
  upload=moejax-upload-$(date +%Y%m%d-%H%M%S)-$$  # lands in the workers' home directories
  stage_checkout "$tmp/$upload"
  gc compute tpus tpu-vm scp "$tmp/$upload" "$NAME:" --recurse --worker=all --zone="$ZONE" --project="$PROJECT"
  ssh_all "set -e; mkdir -p $dir; cp -a $upload/. $dir/; rm -rf $upload; $install"
fi

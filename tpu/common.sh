# shellcheck shell=bash disable=SC2034  # (the variables are for the scripts that source this)
# Shared by the tpu/*.sh scripts (sourced, never run): settings from flags or environment variables,
# the early checks, and the gcloud calls they have in common.
#
# Kept to bash 3.2 (the /bin/bash of macOS workstations): no associative arrays, no mapfile, and no
# "${a[@]}" of an array that may be empty (bash < 4.4 with set -u calls it unbound).
set -euo pipefail

MOEJAX_TPU_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
MOEJAX_ROOT=$(dirname -- "$MOEJAX_TPU_DIR")
SCRIPT=tpu/$(basename -- "$0")

# Settings every script may use; a flag wins over its environment variable.
PROJECT=${MOEJAX_TPU_PROJECT:-}
ZONE=${MOEJAX_TPU_ZONE:-}
NAME=${MOEJAX_TPU_NAME:-}
TYPE=${MOEJAX_TPU_TYPE:-}
RUNTIME=${MOEJAX_TPU_RUNTIME:-}
REMOTE_DIR=${MOEJAX_TPU_REMOTE_DIR:-moejax}
DRY_RUN=0
ARGS=()  # the words after `--`

# Flag tables, "FLAG:VARIABLE" words: VALUE_FLAGS take a value (`--zone Z` or `--zone=Z`), SWITCH_FLAGS
# set their variable to 1. A script adds its own flags to these before calling parse_args.
VALUE_FLAGS="--project:PROJECT --zone:ZONE --name:NAME"
SWITCH_FLAGS="--dry-run:DRY_RUN"
# Whether the script takes a command after `--` (tpu/run.sh).
TAKES_COMMAND=0

COMMON_HELP="
Settings (a flag wins over its environment variable):
  --project PROJECT   Google Cloud project                         [\$MOEJAX_TPU_PROJECT]
  --zone ZONE         zone of the TPU, e.g. us-west4-a             [\$MOEJAX_TPU_ZONE]
  --name NAME         name of the TPU VM                           [\$MOEJAX_TPU_NAME]
  --dry-run           print the gcloud commands instead of running them
  -h, --help          print this help and exit"

REMOTE_DIR_HELP="  --remote-dir DIR    the moejax checkout on the workers, relative to the home
                      directory or absolute (default: moejax)      [\$MOEJAX_TPU_REMOTE_DIR]"

die() {
  printf '%s: error: %s\n' "$SCRIPT" "$*" >&2
  exit 2
}

note() {
  printf '%s: %s\n' "$SCRIPT" "$*" >&2
}

# The variable named for FLAG in a "FLAG:VARIABLE" table, or nothing.
_flag_variable() {
  local flag=$1 table=$2 spec
  for spec in $table; do
    if [ "${spec%%:*}" = "$flag" ]; then
      printf '%s' "${spec#*:}"
      return 0
    fi
  done
}

# Parse the script's arguments into the variables of the flag tables (the script defines usage()).
parse_args() {
  local flag value var has_value
  while [ $# -gt 0 ]; do
    flag=$1
    shift
    case $flag in
      -h | --help)
        usage
        exit 0
        ;;
      --)
        [ "$TAKES_COMMAND" = 1 ] || die "unexpected '--' (see $SCRIPT --help)"
        if [ $# -gt 0 ]; then ARGS=("$@"); fi
        return 0
        ;;
    esac
    has_value=0
    value=
    case $flag in
      --*=*)
        value=${flag#*=}
        flag=${flag%%=*}
        has_value=1
        ;;
    esac
    var=$(_flag_variable "$flag" "$VALUE_FLAGS")
    if [ -n "$var" ]; then
      if [ "$has_value" = 0 ]; then
        [ $# -gt 0 ] || die "$flag needs a value (see $SCRIPT --help)"
        value=$1
        shift
      fi
      [ -n "$value" ] || die "$flag needs a non-empty value"
      printf -v "$var" '%s' "$value"
      continue
    fi
    var=$(_flag_variable "$flag" "$SWITCH_FLAGS")
    if [ -n "$var" ]; then
      [ "$has_value" = 0 ] || die "$flag takes no value"
      printf -v "$var" '%s' 1
      continue
    fi
    die "unknown argument '$flag' (see $SCRIPT --help)"
  done
}

# Stop early, naming the first missing setting: require project zone name [type].
require() {
  local what
  for what in "$@"; do
    case $what in
      project) [ -n "$PROJECT" ] || die "missing the Google Cloud project: pass --project PROJECT or set MOEJAX_TPU_PROJECT" ;;
      zone) [ -n "$ZONE" ] || die "missing the zone: pass --zone ZONE (e.g. us-west4-a) or set MOEJAX_TPU_ZONE" ;;
      name) [ -n "$NAME" ] || die "missing the TPU name: pass --name NAME or set MOEJAX_TPU_NAME" ;;
      type) [ -n "$TYPE" ] || die "missing the accelerator type: pass --type TYPE (e.g. v5litepod-8, v4-32, v5p-64, v6e-16) or set MOEJAX_TPU_TYPE" ;;
      *) die "internal: unknown setting $what" ;;
    esac
  done
}

need_gcloud() {
  [ "$DRY_RUN" = 1 ] || command -v gcloud >/dev/null 2>&1 ||
    die "gcloud is not on PATH: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install), then run 'gcloud auth login'"
}

# Run gcloud with these arguments (printed to stderr first), or with --dry-run only print them.
gc() {
  local line
  line=$(printf ' %q' gcloud "$@")
  line=${line# }
  if [ "$DRY_RUN" = 1 ]; then
    printf '%s\n' "$line"
    return 0
  fi
  note "+ $line"
  gcloud "$@"
}

# Run a shell command on every worker of the TPU VM; the workers' output streams to stdout.
ssh_all() {
  gc compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --project="$PROJECT" --worker=all --command="$1"
}

# $REMOTE_DIR quoted for the workers' shell (a leading ~/ dropped: relative paths start at home).
remote_dir_quoted() {
  printf '%q' "${REMOTE_DIR#\~/}"
}

#!/usr/bin/env bash
# Train moejax on several GPU nodes with SLURM: one task (one JAX process) per node, each using all
# of its node's GPUs. Submit from the moejax checkout, with the Python environment that has moejax
# installed (pip install -e '.[cuda]') active; sbatch passes your environment on to the job:
#
#   sbatch --nodes=2 scripts/slurm_train.sh --set mesh.data=-1 [--set key=value ...]
#   CONFIG=configs/mixtral_tiny_gpu_8.yaml sbatch --nodes=4 scripts/slurm_train.sh --set mesh.data=-1
#
# The arguments after the script name go to python -m moejax.train (mesh.data=-1 makes the 8-GPU
# config's mesh cover all nodes x 8 GPUs). Environment variables:
#   CONFIG                   the config file (default: configs/mixtral_tiny_gpu_8.yaml); its mesh
#                            must cover every GPU of the job: nodes x GPUs per node devices
#   MOEJAX_COORDINATOR_PORT  the port of the JAX coordinator on the first node (default: 1234)
#   PYTHON                   the Python to run (default: python, from PATH)
# Flags given to sbatch (--nodes, --gpus-per-node, --partition, --time, ...) override the #SBATCH
# lines below. See docs/gpu.md.
#SBATCH --job-name=moejax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --output=slurm-%j.out
set -euo pipefail

: "${SLURM_JOB_NODELIST:?is not set: submit this script with sbatch (see docs/gpu.md)}"
cd "${SLURM_SUBMIT_DIR:-.}"

CONFIG=${CONFIG:-configs/mixtral_tiny_gpu_8.yaml}
PYTHON=${PYTHON:-python}
hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
MOEJAX_COORDINATOR=${hosts%%$'\n'*}:${MOEJAX_COORDINATOR_PORT:-1234}  # process 0 runs on the first node
export CONFIG PYTHON MOEJAX_COORDINATOR
echo "moejax: $SLURM_NNODES nodes, coordinator $MOEJAX_COORDINATOR, config $CONFIG" >&2

# One task per node (--ntasks-per-node=1): the node's index is the JAX process id.
# shellcheck disable=SC2016  # expanded by the bash of each task, with that task's SLURM_* values
srun bash -c '
  export JAX_COORDINATOR_ADDRESS="$MOEJAX_COORDINATOR"
  export JAX_NUM_PROCESSES="$SLURM_NNODES"
  export JAX_PROCESS_ID="$SLURM_NODEID"
  exec "$PYTHON" -m moejax.train --config "$CONFIG" "$@"
' moejax-train "$@"

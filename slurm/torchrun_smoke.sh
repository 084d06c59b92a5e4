#!/bin/bash
# Smoke test of the SLURM -> torchrun launch pattern (docs/slurm.md): one
# torchrun per node, NPROC_PER_NODE workers each, static rendezvous on the
# first node; every rank runs the real trainer for 3 steps on tiny synthetic
# data and resumes it for a 4th (nulls_megatron/train/smoke.py: the trainer's
# own process group, devices and collectives), and rank 0 writes
# $SLURM_SMOKE_RESULT.
#
#   sbatch slurm/torchrun_smoke.sh                        # 2 nodes, GPUs/NCCL
#   sbatch --nodes=1 --cpus-per-task=2 --export=ALL,NPROC_PER_NODE=2 \
#       slurm/torchrun_smoke.sh                           # 1 node, 2 CPU/gloo ranks
#
# Environment (all optional): PYTHON (interpreter with torch and this repo's
# requirements; default python3), REPO_DIR (this repository; default the
# submit directory), NPROC_PER_NODE (default: GPUs on the node, else 1),
# SLURM_SMOKE_RESULT (default: slurm-smoke-<jobid>.json in REPO_DIR; its
# work files go beside it), SRUN_ARGS (extra srun options, e.g. a container:
# SRUN_ARGS="--container-image=nvcr.io#nvidia/pytorch:25.01-py3 --container-mounts=/shared:/shared").
#SBATCH --job-name=torchrun-smoke
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=00:10:00
#SBATCH --output=slurm-%x-%j.out

set -euo pipefail

export PYTHON="${PYTHON:-python3}"
REPO_DIR="${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}"
cd "$REPO_DIR"
export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"
export SLURM_SMOKE_RESULT="${SLURM_SMOKE_RESULT:-$REPO_DIR/slurm-smoke-$SLURM_JOB_ID.json}"

# MASTER_ADDR, MASTER_PORT, NNODES, NODE_RANK, NPROC_PER_NODE
eval "$("$PYTHON" -m launch.slurm env)"
echo "job $SLURM_JOB_ID: $NNODES node(s) x $NPROC_PER_NODE process(es), rendezvous $MASTER_ADDR:$MASTER_PORT"

# One task per node; SLURM_NODEID is expanded inside each task (single quotes).
read -r -a srun_extra <<< "${SRUN_ARGS:-}"
srun --nodes="$NNODES" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --kill-on-bad-exit=1 \
    "${srun_extra[@]}" bash -c '
    exec "$PYTHON" -m torch.distributed.run \
        --nnodes "$NNODES" --node_rank "$SLURM_NODEID" --nproc_per_node "$NPROC_PER_NODE" \
        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --max_restarts 0 \
        -m nulls_megatron.train.smoke'
echo "job $SLURM_JOB_ID: result in $SLURM_SMOKE_RESULT"

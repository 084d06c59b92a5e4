#!/bin/bash
# Pretraining of the paper's 1B NULLs model on Wikipedia (6.4M articles, one
# source each; configs/wiki_1b_paper.yaml) under SLURM, with the launch pattern
# of docs/slurm.md: one torchrun per node, NPROC_PER_NODE workers each, static
# rendezvous on the first node, `nulls train` on every worker. A job that nears
# its time limit requeues itself; every start runs the same command and the
# trainer resumes from <train.run_dir>/checkpoints/latest.
#
#   sbatch --export=ALL,OVERRIDES=train.data=/shared/prep/enwiki-20231101 \
#       slurm/pretrain_6m.sh                              # 8 nodes x 8 GPUs, NCCL
#   sbatch --nodes=1 --gpus-per-node=0 --cpus-per-task=2 --time=00:30:00 \
#       --export=ALL,NPROC_PER_NODE=2,CONFIG=configs/demo_cpu.yaml,RUN_DIR=runs/cpu,OVERRIDES="train.data=prep/demo train.steps=20" \
#       slurm/pretrain_6m.sh                              # 1 node, 2 CPU/gloo ranks
#
# Environment (all optional): PYTHON (interpreter with torch and this repo's
# requirements; default python3), REPO_DIR (this repository; default the
# submit directory; relative paths below are relative to it), CONFIG (default
# configs/wiki_1b_paper.yaml), OVERRIDES (space-separated dotted.key=value
# items, each passed as --set; values cannot contain spaces), RUN_DIR (when
# set: --set train.run_dir=$RUN_DIR; keep it the same for every submission of
# one run; unset, a config whose run_dir is relative (inside the checkout)
# runs under $SCRATCH/nulls-runs/ when $SCRATCH is set, and is refused
# otherwise), NPROC_PER_NODE (default: GPUs on the node, else 1), MASTER_PORT
# (default 15000 + job id mod 20000), SRUN_ARGS (extra srun options, e.g. a
# pyxis container: SRUN_ARGS="--container-image=IMAGE --container-mounts=/shared:/shared"),
# NCCL_* / TORCH_NCCL_* (see below).
# Outputs (run_dir) must be on a file system every node shares.
#SBATCH --job-name=nulls-pretrain-6m
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300

set -euo pipefail

export PYTHON="${PYTHON:-python3}"
REPO_DIR="${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}"
cd "$REPO_DIR"
export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"

CONFIG="${CONFIG:-configs/wiki_1b_paper.yaml}"
read -r -a override_items <<< "${OVERRIDES:-}"
TRAIN_ARGS=(--config "$CONFIG")
for item in "${override_items[@]}"; do
    TRAIN_ARGS+=(--set "$item")
done
if [[ -n "${RUN_DIR:-}" ]]; then
    TRAIN_ARGS+=(--set "train.run_dir=$RUN_DIR")
fi
read -r -a srun_extra <<< "${SRUN_ARGS:-}"

# NCCL (ignored by gloo/CPU runs). Async error handling turns a hung collective
# into an error after the process group timeout, so --kill-on-bad-exit ends the
# job instead of it hanging until the time limit (NCCL_ASYNC_ERROR_HANDLING
# before torch 2.2). Site-specific fabric settings, only where needed:
#   export NCCL_SOCKET_IFNAME=ib0      # interface for the bootstrap and socket transport
#   export NCCL_IB_HCA=mlx5            # InfiniBand adapters to use
#   export NCCL_IB_DISABLE=1           # no InfiniBand: TCP sockets only
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"  # Megatron's TP comm overlap

# MASTER_ADDR, MASTER_PORT, NNODES, NODE_RANK, NPROC_PER_NODE
eval "$("$PYTHON" -m launch.slurm env)"
echo "job $SLURM_JOB_ID (start $((${SLURM_RESTART_COUNT:-0} + 1))): $NNODES node(s) x $NPROC_PER_NODE process(es), rendezvous $MASTER_ADDR:$MASTER_PORT"

# Validate the config and overrides once, before the nodes start, and say where
# the run lives and whether this start resumes (stderr); stdout is the run dir.
RUN_DIR_RESOLVED=$("$PYTHON" - "${TRAIN_ARGS[@]}" <<'PY'

import argparse
import os
import sys
from pathlib import Path

from data_prep.shards import SHARD_INDEX_NAME
from nulls_megatron.config import ConfigError, load_config

parser = argparse.ArgumentParser()
parser.add_argument("--config", required=True)
parser.add_argument("--set", dest="overrides", action="append", default=[])
args = parser.parse_args()
try:
    cfg = load_config(args.config, args.overrides)
except ConfigError as err:
    sys.exit(f"pretrain_6m.sh: {err}")
t = cfg.train
if not (Path(t.data) / SHARD_INDEX_NAME).is_file():
    sys.exit(f"pretrain_6m.sh: train.data={t.data!r} has no {SHARD_INDEX_NAME}: set it to the output "
             "directory of `nulls prep` (OVERRIDES=train.data=...)")
if not Path(t.run_dir).is_absolute() and not os.environ.get("RUN_DIR"):
    # A relative run dir would sit inside the checkout (the submit directory): not where checkpoints
    # of a cluster run belong, and not shared between nodes everywhere.
    scratch = os.environ.get("SCRATCH")
    if not scratch:
        sys.exit(f"pretrain_6m.sh: train.run_dir={t.run_dir!r} is inside the checkout; set RUN_DIR to a directory "
                 "on a shared file system (or $SCRATCH, under which runs then go)")
    t.run_dir = str(Path(scratch) / "nulls-runs" / Path(t.run_dir).name)
run_dir = Path(t.run_dir).resolve()
latest = run_dir / "checkpoints" / "latest"
where = f"resuming from {latest.read_text().strip()}" if latest.is_file() else "no checkpoint yet: starting at step 0"
print(f"config {args.config}: data {Path(t.data).resolve()}, run_dir {run_dir}, {t.steps} steps of "
      f"{t.global_batch_rows} x {cfg.model.seq_length} tokens, TP {cfg.parallel.tensor_parallel} x "
      f"PP {cfg.parallel.pipeline_parallel}; {where}", file=sys.stderr, flush=True)
print(run_dir)
PY
)
# Every rank trains in the run dir resolved above (absolute: $SCRATCH/... when the config's was relative).
TRAIN_ARGS+=(--set "train.run_dir=$RUN_DIR_RESOLVED")

# Near the time limit SLURM sends USR1 to this shell (--signal=B:USR1@300). The
# trap asks the trainer to stop through <run_dir>/STOP (every rank checks after
# each step: it finishes the step, writes a checkpoint and exits 0), and the job
# is requeued once training has exited. The next start (same job id, same
# MASTER_PORT, same run_dir) resumes from that checkpoint: nothing is lost.
# A file, not a signal, because torchrun SIGKILLs its workers 30 s after
# forwarding a signal, too soon to save a 1B model's checkpoint.
requeue_requested=0
request_stop() {
    echo "job $SLURM_JOB_ID: time limit near: checkpointing, then requeueing"
    requeue_requested=1
    mkdir -p "$RUN_DIR_RESOLVED" && touch "$RUN_DIR_RESOLVED/STOP"
}
trap request_stop USR1

# One task per node with all of the task's CPUs (srun does not inherit
# --cpus-per-task since SLURM 22.05); SLURM_NODEID is expanded inside each task
# (single quotes) and the trainer's arguments arrive as "$@".
srun --nodes="$NNODES" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --kill-on-bad-exit=1 \
    "${srun_extra[@]}" bash -c '
    exec "$PYTHON" -m torch.distributed.run \
        --nnodes "$NNODES" --node_rank "$SLURM_NODEID" --nproc_per_node "$NPROC_PER_NODE" \
        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --max_restarts 0 \
        -m nulls_megatron.cli train "$@"' bash "${TRAIN_ARGS[@]}" &
srun_pid=$!
# Bash runs a trap only between commands, so srun runs in the background and
# `wait` is repeated: a trapped USR1 returns from `wait` while srun still runs.
while true; do
    status=0
    wait "$srun_pid" || status=$?
    kill -0 "$srun_pid" 2>/dev/null || break
done
echo "job $SLURM_JOB_ID: training exited with $status"
if [[ "$requeue_requested" == 1 && "$status" == 0 ]]; then
    if [[ -e "$RUN_DIR_RESOLVED/STOP" ]]; then
        # Training reached train.steps before it saw the request: nothing left to requeue for.
        rm -f "$RUN_DIR_RESOLVED/STOP"
    else
        scontrol requeue "$SLURM_JOB_ID"
    fi
fi
exit "$status"

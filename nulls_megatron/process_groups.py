"""Bring up torch.distributed and Megatron's model-parallel state for a run."""
from __future__ import annotations

import os
from datetime import timedelta

import torch.distributed as dist
from megatron.core import parallel_state

from launch.env import find_free_port, init_distributed_from_env

from .config import ParallelConfig
from .compat import model_parallel_seed

_LAUNCHER_VARS = ("WORLD_SIZE", "SLURM_NTASKS")


def init_model_parallel(parallel: ParallelConfig, seed: int) -> None:
    """Initialise the process group (from torchrun/SLURM variables, or as a single
    local process when launched plainly) and the TP x PP groups (and the expert-parallel groups of the
    sink pool: EP carved out of data parallelism), then seed.

    Safe to call again in one process (e.g. to switch TP size in a test): the
    process group is reused and the model-parallel groups are rebuilt.
    """
    if not dist.is_initialized():
        if not any(v in os.environ for v in _LAUNCHER_VARS) and not os.environ.get("MASTER_PORT"):
            # A plain single process: any free port, so that concurrent runs never collide.
            os.environ["MASTER_PORT"] = str(find_free_port())
        init_distributed_from_env(timeout=timedelta(minutes=parallel.timeout_minutes))
    world = dist.get_world_size()
    model_parallel = parallel.tensor_parallel * parallel.pipeline_parallel
    if world % model_parallel:
        raise ValueError(
            f"world size {world} is not a multiple of tensor_parallel x pipeline_parallel = {model_parallel}"
        )
    data_parallel = world // model_parallel
    if data_parallel % parallel.expert_parallel:
        raise ValueError(f"parallel.expert_parallel = {parallel.expert_parallel} does not divide the data-parallel size "
                         f"{data_parallel} (world {world} / tensor_parallel x pipeline_parallel {model_parallel})")
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        # The sink pool is sharded over data-parallel replicas only: expert tensor parallelism is the
        # tensor-parallel size, so that tensor-parallel peers, which hold the same tokens, hold the
        # same pool shard (replicated, as the whole table is without EP) and never dispatch a token twice.
        expert_model_parallel_size=parallel.expert_parallel,
        expert_tensor_parallel_size=parallel.tensor_parallel,
        distributed_timeout_minutes=parallel.timeout_minutes,
    )
    model_parallel_seed(seed)

"""Launch helpers: environment detection (``launch.env``) and a local
multi-process launcher for tests and CPU demos (``launch.local``)."""

from launch.env import (
    DistEnv,
    compute_device,
    distributed_backend,
    find_free_port,
    init_distributed_from_env,
    read_dist_env,
)
from launch.local import RankFailedError, run_local

__all__ = [
    "DistEnv",
    "RankFailedError",
    "compute_device",
    "distributed_backend",
    "find_free_port",
    "init_distributed_from_env",
    "read_dist_env",
    "run_local",
]

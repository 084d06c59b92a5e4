"""Environment detection for distributed runs: backend, ports, and
``torch.distributed`` initialisation from torchrun or SLURM variables.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``.  Under ``srun`` without torchrun only SLURM's own variables
exist; ``SLURM_PROCID``, ``SLURM_NTASKS`` and ``SLURM_LOCALID`` stand in for the
first three, the first host of ``SLURM_JOB_NODELIST`` for ``MASTER_ADDR`` and a
port derived from ``SLURM_JOB_ID`` for ``MASTER_PORT`` (every task of a job
derives the same one).
"""

from __future__ import annotations

import os
import random
import re
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Optional

import torch
import torch.distributed as dist

DEFAULT_MASTER_PORT = 29500


def distributed_backend(cuda: Optional[bool] = None) -> str:
    """The process group backend: ``"cpu:gloo,cuda:nccl"`` on a CUDA machine, ``"gloo"`` without CUDA.

    One group, two backends: collectives on CUDA tensors (gradients, pipeline activations, Megatron's
    own) go through NCCL, and the trainer's control-plane scalars, which live on the CPU (the stop
    agreement, the pipeline loss, global token counts, the grad norm's sum, sink statistics, gathered
    objects), go through gloo. A plain ``nccl`` group has no CPU path and fails at the first of them.
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def compute_device(cuda: Optional[bool] = None) -> torch.device:
    """Where this process's model and batches live: its CUDA device (set from ``LOCAL_RANK`` by
    :func:`init_distributed_from_env`), else the CPU. The one place that decides it."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


DEFAULT_TIMEOUT = timedelta(minutes=60)  # NCCL's 10-minute default is shorter than a 1B checkpoint's finalize


def _ephemeral_port_floor() -> int:
    """The lowest port the kernel hands to outgoing connections (Linux: ip_local_port_range)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free right now, chosen below the kernel's ephemeral range.

    Another process may take it before it is bound again. A port the OS picks (bind to 0) lies in the
    ephemeral range, which every outgoing connection draws from meanwhile: with seconds between the
    choice and the bind (a SLURM job's scheduling) such a collision killed a test job. Ports below
    the range are taken only by servers that ask for them.
    """
    floor = _ephemeral_port_floor()
    draw = random.SystemRandom()
    for _ in range(64):
        port = draw.randrange(max(1024, floor - 12000), floor)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # all tried were busy: let the OS pick
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: ``"gpu[03-05,09],cpu1"`` -> ``"gpu03"``,
    ``"rack[1-2]-n[01-02]"`` -> ``"rack1-n01"``."""
    text = nodelist.strip()
    depth, end = 0, len(text)
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth < 0 or depth > 1:
            raise ValueError(f"cannot parse SLURM node list {nodelist!r}: unbalanced brackets")
        if char == "," and depth == 0:
            end = i
            break
    first = text[:end]
    # every bracket group of the first element contributes its first value
    host = re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], first)
    if not host or "[" in host or "]" in host:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    return host


def read_dist_env(environ: Optional[Mapping[str, str]] = None) -> DistEnv:
    """Rank, world size, local rank and rendezvous address from the environment.

    torchrun variables win; SLURM variables fill in what is missing; with
    neither, this is a single process (rank 0 of 1) on 127.0.0.1.
    """
    env = os.environ if environ is None else environ

    def pick(torchrun_name: str, slurm_name: str, default: str) -> str:
        return env.get(torchrun_name) or env.get(slurm_name) or default

    rank = int(pick("RANK", "SLURM_PROCID", "0"))
    world_size = int(pick("WORLD_SIZE", "SLURM_NTASKS", "1"))
    local_rank = int(pick("LOCAL_RANK", "SLURM_LOCALID", "0"))
    master_addr = env.get("MASTER_ADDR")
    if not master_addr:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if nodelist and int(env.get("SLURM_NNODES", "2")) > 1:
            master_addr = first_slurm_host(nodelist)
        else:
            master_addr = "127.0.0.1"
    if env.get("MASTER_PORT"):
        master_port = int(env["MASTER_PORT"])
    elif env.get("SLURM_JOB_ID"):
        master_port = 15000 + int(env["SLURM_JOB_ID"]) % 20000
    else:
        master_port = DEFAULT_MASTER_PORT
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    return DistEnv(rank, world_size, local_rank, master_addr, master_port)


def init_distributed_from_env(
    backend: Optional[str] = None, timeout: Optional[timedelta] = None
) -> DistEnv:
    """Initialise ``torch.distributed`` from torchrun/SLURM variables.

    Uses :func:`distributed_backend` unless ``backend`` is given, and on GPU
    selects the CUDA device ``LOCAL_RANK`` first. ``timeout`` (default 60 minutes) bounds every
    collective: a rank that hangs fails the job after it instead of holding the allocation.  Exports the resolved
    ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` so
    that libraries reading them see the same values.  Does nothing if a
    default process group already exists (returns the detected environment).
    """
    info = read_dist_env()
    if dist.is_initialized():
        return info
    backend = backend or distributed_backend()
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    os.environ.update(
        RANK=str(info.rank),
        WORLD_SIZE=str(info.world_size),
        LOCAL_RANK=str(info.local_rank),
        MASTER_ADDR=info.master_addr,
        MASTER_PORT=str(info.master_port),
    )
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{info.master_addr}:{info.master_port}",
        rank=info.rank,
        world_size=info.world_size,
        timeout=timeout or DEFAULT_TIMEOUT,
    )
    return info

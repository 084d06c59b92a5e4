"""Turn a SLURM allocation's environment into torchrun's rendezvous settings.

A job script evaluates this once in the batch step and hands the values to one
``torchrun`` per node (see ``slurm/torchrun_smoke.sh`` and ``docs/slurm.md``)::

    eval "$(python -m launch.slurm env)"
    srun bash -c 'torchrun --nnodes "$NNODES" --node_rank "$SLURM_NODEID" \\
        --nproc_per_node "$NPROC_PER_NODE" \\
        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m my.module'

| exported        | from                                                                   |
|-----------------|------------------------------------------------------------------------|
| MASTER_ADDR     | ``$MASTER_ADDR``; else the first host of ``SLURM_JOB_NODELIST`` (``scontrol show hostnames``, or parsed when scontrol is missing) on multi-node jobs, 127.0.0.1 on one node |
| MASTER_PORT     | ``$MASTER_PORT``; else 15000 + job id mod 20000 (``launch.env.read_dist_env``) |
| NNODES          | ``SLURM_JOB_NUM_NODES`` (or ``SLURM_NNODES``)                           |
| NODE_RANK       | ``SLURM_NODEID`` (0 in the batch step; inside ``srun`` the node's index) |
| NPROC_PER_NODE  | ``$NPROC_PER_NODE``; else ``SLURM_GPUS_ON_NODE``; else the visible CUDA devices; else 1 |
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import List, Mapping, Optional

from launch.env import first_slurm_host, read_dist_env


class SlurmEnvError(ValueError):
    """The environment is not a usable SLURM allocation (message names the variable)."""


@dataclass(frozen=True)
class TorchrunSettings:
    """What ``torchrun`` needs on every node of the job."""

    master_addr: str
    master_port: int
    nnodes: int
    node_rank: int
    nproc_per_node: int

    def export_lines(self) -> str:
        """``export NAME=value`` lines for ``eval`` in bash."""
        values = {
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
            "NNODES": str(self.nnodes),
            "NODE_RANK": str(self.node_rank),
            "NPROC_PER_NODE": str(self.nproc_per_node),
        }
        return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in values.items())


def first_host(nodelist: str, use_scontrol: bool = True) -> str:
    """First host of a SLURM node list such as ``"node[001-004,010]"``.

    Asks ``scontrol show hostnames`` (SLURM's own parser) when it is on PATH,
    else falls back to :func:`launch.env.first_slurm_host`.
    """
    if not nodelist.strip():
        raise SlurmEnvError("empty SLURM node list")
    if use_scontrol and shutil.which("scontrol"):
        proc = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30
        )
        hosts = proc.stdout.split()
        if proc.returncode == 0 and hosts:
            return hosts[0]
    try:
        return first_slurm_host(nodelist)
    except ValueError as exc:
        raise SlurmEnvError(str(exc)) from exc


def _int_var(env: Mapping[str, str], names: List[str], default: Optional[int] = None) -> int:
    for name in names:
        raw = env.get(name)
        if raw:
            # SLURM_GPUS_PER_NODE may read "gpu:4" or "a100:4"; the count is last.
            text = raw.rsplit(":", 1)[-1].split("(")[0]
            try:
                value = int(text)
            except ValueError:
                raise SlurmEnvError(f"${name}={raw!r} is not an integer") from None
            if value < 0:
                raise SlurmEnvError(f"${name}={raw!r} is negative")
            return value
    if default is None:
        raise SlurmEnvError(f"none of ${', $'.join(names)} is set; run inside an sbatch/salloc allocation")
    return default


def _default_nproc() -> int:
    import torch  # only when SLURM does not say how many GPUs this node has

    return torch.cuda.device_count() or 1


def torchrun_settings(environ: Optional[Mapping[str, str]] = None, use_scontrol: bool = True) -> TorchrunSettings:
    """Rendezvous settings for ``torchrun`` from SLURM's variables (table above)."""
    env = os.environ if environ is None else environ
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist or not env.get("SLURM_JOB_ID"):
        raise SlurmEnvError(
            "SLURM_JOB_NODELIST and SLURM_JOB_ID must be set; run inside an sbatch/salloc allocation"
        )
    nnodes = _int_var(env, ["SLURM_JOB_NUM_NODES", "SLURM_NNODES"])
    node_rank = _int_var(env, ["SLURM_NODEID"], default=0)
    if nnodes < 1 or node_rank >= nnodes:
        raise SlurmEnvError(f"$SLURM_NODEID={node_rank} is outside the job's {nnodes} node(s)")
    nproc = _int_var(env, ["NPROC_PER_NODE", "SLURM_GPUS_ON_NODE"], default=0) or _default_nproc()

    # read_dist_env owns the port rule and the explicit MASTER_* overrides; the
    # rank fields it also reads are irrelevant in the batch step.
    base = read_dist_env({k: env[k] for k in ("MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID") if k in env})
    if env.get("MASTER_ADDR"):
        addr = env["MASTER_ADDR"]
    elif nnodes > 1:
        addr = first_host(nodelist, use_scontrol)
    else:
        addr = "127.0.0.1"  # one node: loopback needs no name resolution
    return TorchrunSettings(addr, base.master_port, nnodes, node_rank, nproc)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.slurm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="print `export` lines for MASTER_ADDR, MASTER_PORT, NNODES, NODE_RANK, NPROC_PER_NODE")
    parser.parse_args(argv)
    try:
        settings = torchrun_settings()
    except SlurmEnvError as exc:
        print(f"launch.slurm: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(settings.export_lines())
    return 0


if __name__ == "__main__":
    sys.exit(main())

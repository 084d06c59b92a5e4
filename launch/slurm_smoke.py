"""Smoke test of a SLURM + torchrun launch: every rank joins the process group
(``launch.env.init_distributed_from_env``), all-reduces ``rank + 1`` and
reports where it runs; rank 0 writes one JSON file with all reports to
``$SLURM_SMOKE_RESULT`` (atomically: temp file + ``os.replace``)::

    SLURM_SMOKE_RESULT=/shared/smoke.json torchrun ... -m launch.slurm_smoke

Exits non-zero if the all-reduce is wrong, so a broken fabric fails the job.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from datetime import timedelta
from typing import Any, Dict

import torch
import torch.distributed as dist

from launch.env import distributed_backend, init_distributed_from_env

RESULT_VAR = "SLURM_SMOKE_RESULT"


def _write_json_atomic(path: str, payload: Dict[str, Any]) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def main() -> int:
    out_path = os.environ.get(RESULT_VAR)
    if not out_path:
        print(f"launch.slurm_smoke: set ${RESULT_VAR} to the JSON file to write", file=sys.stderr)
        return 2
    backend = distributed_backend()
    info = init_distributed_from_env(backend=backend, timeout=timedelta(seconds=120))
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    value = torch.tensor([float(info.rank + 1)], device=device)
    dist.all_reduce(value)
    report = {
        "rank": info.rank,
        "local_rank": info.local_rank,
        "world_size": info.world_size,
        "host": socket.gethostname(),
        "node_id": int(os.environ.get("SLURM_NODEID", "-1")),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "all_reduce": value.item(),
    }
    reports = [None] * info.world_size
    dist.all_gather_object(reports, report)
    expected = info.world_size * (info.world_size + 1) / 2
    ok = all(r["all_reduce"] == expected for r in reports)
    if info.rank == 0:
        _write_json_atomic(out_path, {
            "backend": backend,
            "world_size": info.world_size,
            "master_addr": info.master_addr,
            "master_port": info.master_port,
            "expected_all_reduce": expected,
            "ok": ok,
            "ranks": reports,
        })
    dist.destroy_process_group()
    if not ok:
        print(f"launch.slurm_smoke: all_reduce gave {value.item()}, expected {expected}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

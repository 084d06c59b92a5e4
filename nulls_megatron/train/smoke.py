"""The SLURM smoke job, through the trainer's own code path: ``python -m nulls_megatron.train.smoke``.

Every rank joins the process group exactly as `nulls train` does (``init_model_parallel``: the
mixed ``cpu:gloo,cuda:nccl`` group on GPU nodes, the configured timeout), rank 0 writes a tiny
synthetic shard set, and all ranks run the real trainer for 3 steps (forward, backward, the
trainer's control-plane collectives, a checkpoint with digests) and resume it for a 4th. Rank 0
writes one JSON report to ``$SLURM_SMOKE_RESULT`` (atomically): per rank its host, device, process
group backend and losses. The job fails (exit 1) unless every loss is finite, every rank saw the
same losses, and the resumed step continued from the checkpoint: a fabric or device problem that
would break training breaks the smoke job too.

    SLURM_SMOKE_RESULT=/shared/smoke.json torchrun ... -m nulls_megatron.train.smoke
"""
from __future__ import annotations

import json
import math
import os
import socket
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

RESULT_VAR = "SLURM_SMOKE_RESULT"
STEPS = 3
VOCAB = 256


def write_synthetic_data(out: Path, documents: int = 24, seed: int = 0) -> Path:
    """Random-token documents (one source each) in two webdataset shards, as `nulls prep` lays them out."""
    from data_prep.shards import SHARD_DIR, SHARD_INDEX_NAME, shard_index_json, shard_name, write_shard

    rng = np.random.default_rng(seed)
    docs = [(i, rng.integers(0, VOCAB, int(rng.integers(20, 200))).astype(np.uint16), f"doc {i}", f"smoke:{i}")
            for i in range(documents)]
    (out / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    half = documents // 2
    infos = [write_shard(out / SHARD_DIR / shard_name(s), s, part) for s, part in enumerate((docs[:half], docs[half:]))]
    (out / SHARD_INDEX_NAME).write_bytes(shard_index_json(infos, "uint16", "0" * 64))
    return out


def smoke_config(data: Path, run_dir: Path, world: int, steps: int):
    from ..config import config_from_dict

    return config_from_dict({
        "model": {"vocab_size": VOCAB, "hidden_size": 64, "num_layers": 2, "num_attention_heads": 4,
                  "num_query_groups": 2, "ffn_hidden_size": 8 + 128, "seq_length": 64},
        "nulls": {"n_backbone": 8, "n_pool": 128, "sinks_per_source": 8},
        "optimizer": {"warmup_steps": 1},
        "train": {"data": str(data), "run_dir": str(run_dir), "steps": steps, "micro_batch_rows": 2,
                  "global_batch_rows": 2 * world, "save_every": STEPS, "verify_shards": True},
        "tracking": {"enabled": False},
    }, "smoke")


def _write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def main() -> int:
    out_path = os.environ.get(RESULT_VAR)
    if not out_path:
        print(f"nulls_megatron.train.smoke: set ${RESULT_VAR} to the JSON file to write", file=sys.stderr)
        return 2
    from ..config import ParallelConfig
    from ..process_groups import init_model_parallel
    from .trainer import train

    init_model_parallel(ParallelConfig(), seed=1234)
    rank, world = dist.get_rank(), dist.get_world_size()
    work = Path(out_path).with_name(Path(out_path).name + ".work")
    if rank == 0:
        write_synthetic_data(work / "data")
    dist.barrier()
    first = train(smoke_config(work / "data", work / "run", world, STEPS))
    resumed = train(smoke_config(work / "data", work / "run", world, STEPS + 1))
    report = {
        "rank": rank, "world_size": world, "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
        "host": socket.gethostname(), "node_id": int(os.environ.get("SLURM_NODEID", "-1")),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "backend": str(dist.get_backend()),
        "device": str(torch.cuda.current_device()) if torch.cuda.is_available() else "cpu",
        "losses": first.losses + resumed.losses, "resumed_from": resumed.resumed_from,
    }
    reports: list[dict | None] = [None] * world
    dist.all_gather_object(reports, report)
    losses = reports[0]["losses"]
    problems = []
    if len(losses) != STEPS + 1 or not all(math.isfinite(x) for x in losses):
        problems.append(f"expected {STEPS + 1} finite losses, got {losses}")
    if any(r["losses"] != losses for r in reports):
        problems.append("ranks disagree on the losses")
    if any(not (r["resumed_from"] or "").endswith(f"step-{STEPS:09d}") for r in reports):
        problems.append("the 4th step did not resume from the step-3 checkpoint")
    if rank == 0:
        _write_json_atomic(Path(out_path), {"ok": not problems, "problems": problems, "world_size": world,
                                            "backend": report["backend"], "steps": STEPS + 1, "ranks": reports})
    dist.barrier()
    dist.destroy_process_group()
    for problem in problems:
        print(f"nulls_megatron.train.smoke: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

"""The retrain-from-scratch oracle: the model's own run config, seed and schedule, with the forget
set removed from the data (``train.exclude_sources``), trained by ``nulls train``."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import yaml

from ..checkpoint.atomic import read_latest


def oracle_config(checkpoint: Path, forget: Sequence[int], run_dir: Path) -> dict:
    """The checkpoint's run config with ``forget`` excluded, a fresh run directory and no resume."""
    path = checkpoint / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the checkpoint holds no run config; train the oracle yourself "
                                "and pass --oracle")
    cfg = yaml.safe_load(path.read_text())
    train = cfg.setdefault("train", {})
    train["exclude_sources"] = sorted({*train.get("exclude_sources", []), *map(int, forget)})
    train["run_dir"] = str(run_dir)
    cfg.setdefault("tracking", {})["run_name"] = f"oracle-{run_dir.parent.name}"
    return cfg


def train_oracle(checkpoint: Path, forget: Sequence[int], out: Path, nproc: int | None = None) -> Path:
    """Train (or finish training) the oracle under ``out/oracle`` and return its final checkpoint.

    ``nproc``: processes to launch (default: the tensor x pipeline x expert-parallel size of the run
    config: an expert-parallel pool needs that many data-parallel replicas)."""
    run_dir = out / "oracle"
    cfg = oracle_config(checkpoint, forget, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = out / "oracle_config.yaml"
    config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    parallel = cfg.get("parallel", {})
    nproc = nproc or (int(parallel.get("tensor_parallel", 1)) * int(parallel.get("pipeline_parallel", 1))
                      * int(parallel.get("expert_parallel", 1)))
    print(f"eval: training the oracle without {len(forget)} sources ({nproc} processes) -> {run_dir}", flush=True)
    done = subprocess.run([sys.executable, "-m", "nulls_megatron.cli", "train", "--config", str(config_path),
                           "--nproc", str(nproc)], env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if done.returncode != 0:
        raise RuntimeError(f"oracle training failed (exit {done.returncode}); its config is {config_path}")
    final = read_latest(run_dir / "checkpoints")
    if final is None:
        raise RuntimeError(f"{run_dir / 'checkpoints'}: the oracle run wrote no checkpoint")
    return final

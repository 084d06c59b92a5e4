"""Plumbing shared by the studies in ``benchmarks/`` that train several models and evaluate them
(``unlearning_quality.py``, ``book_case_study.py``): atomic JSON results, ``nulls prep`` of their
configs, finished-training checks, ``nulls unlearn`` into a study folder, and a runner of child
processes (``--jobs`` at a time, with dependencies, output prefixed by the job's name) so that a
killed study resumes from what it finished.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout, no install

DATA = Path(os.environ.get("NULLS_SHARED_DATA") or ROOT.parent / "shared" / "data")

# The studies' --quick model: the model of configs/repro_small.yaml shrunk to run in a test's minutes.
QUICK_MODEL_OVERRIDES = ["model.seq_length=128", "model.hidden_size=32", "nulls.n_pool=256", "nulls.sinks_per_source=8",
                         "nulls.n_backbone=16", "model.ffn_hidden_size=272", "train.save_every=0", "train.log_every=20",
                         "optimizer.warmup_steps=5"]


def use_study_store(out: Path) -> str:
    """Every run of a study (trainings, evaluations) tracked in one MLflow store, OUT/mlflow.db, unless
    MLFLOW_TRACKING_URI names another: children inherit it (they run in the checkout, whose ./mlflow.db
    would otherwise be the default). Returns the URI, for the ``mlflow ui`` line."""
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{Path(out).resolve() / 'mlflow.db'}")
    return os.environ["MLFLOW_TRACKING_URI"]


def say(line: str) -> None:
    print(line, flush=True)


def write_json(path: Path, data) -> None:
    from nulls_megatron.checkpoint.atomic import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def read_json(path: Path):
    return json.loads(path.read_text())


def require_data(path: Path) -> Path:
    if not path.exists():
        sys.exit(f"{path}: missing; this benchmark reads the shared data (see ../shared/data/README.md)")
    return path


def run_prep_configs(paths: Sequence[Path]) -> None:
    """``nulls prep`` of each config in one Ray session (the real pipeline, ``run_prep``); a folder
    whose prep finished is reused."""
    import ray

    from data_prep.config import load_prep_config
    from data_prep.pipeline import run_prep
    from data_prep.ray_session import connect_ray

    started = connect_ray(load_prep_config(paths[0]).ray)
    try:
        for path in paths:
            cfg = load_prep_config(path)
            if (Path(cfg.output_dir) / "prep_report.json").is_file():
                say(f"prep: {cfg.output_dir} is finished; reused")
                continue
            say(f"prep: nulls prep --config {path}")
            summary = run_prep(cfg, progress=False)
            say(f"prep: {summary['documents']:,} documents, {summary['tokens']:,} tokens, {summary['shards']} shards "
                f"-> {cfg.output_dir}")
    finally:
        if started:
            ray.shutdown()


def finished_checkpoint(run_dir: str | Path, steps: int) -> Path | None:
    """The run's final checkpoint when its training is done, else None."""
    from nulls_megatron.checkpoint.atomic import read_latest

    root = Path(run_dir) / "checkpoints"
    if not (root / "latest").is_file():
        return None
    ckpt = read_latest(root)
    if ckpt is None or not (ckpt / "train_state.json").is_file():
        return None
    return ckpt if int(read_json(ckpt / "train_state.json")["step"]) >= steps else None


def unlearned_version(checkpoint: Path, requests: list, out: Path, expected: Sequence[int] | None = None) -> Path:
    """``nulls unlearn`` of ``requests`` (``unlearn.requests.Request``) from ``checkpoint`` into ``out``;
    reused when ``out`` already has every source of ``expected`` (the resolved indices) disabled."""
    from nulls_megatron.checkpoint.sinks import read_sink_manifest, source_state
    from nulls_megatron.unlearn.service import run_unlearn

    if out.is_dir():
        try:
            if expected and set(expected) <= set(source_state(read_sink_manifest(out)).disabled_sources):
                return out
        except (OSError, ValueError, KeyError):
            pass
        shutil.rmtree(out)
    outcome = run_unlearn(checkpoint, requests, out=out, say=lambda line: say(f"unlearn: {line}"),
                          show_collateral=False)
    return outcome.written.path


def index_requests(sources: Sequence[int]) -> list:
    from nulls_megatron.unlearn.requests import Request

    return [Request("index", str(i), "--source-index") for i in sources]


def ensure_routing_index(checkpoint: Path) -> None:
    """The checkpoint's routing index (titles, MiniLM), built when absent."""
    from nulls_megatron.routing.build import build_index, checkpoint_sources
    from nulls_megatron.routing.source_index import RoutingIndexMissing, SourceIndex

    sources = checkpoint_sources(checkpoint)
    try:
        SourceIndex.open(sources.checkpoint, sources.manifest_sha256)
    except RoutingIndexMissing:
        say(f"index: building the routing index of {sources.checkpoint} (titles, MiniLM)")
        build_index(sources.checkpoint, progress=False)


def open_routing_index(checkpoint: Path):
    from nulls_megatron.routing.build import checkpoint_sources
    from nulls_megatron.routing.source_index import SourceIndex

    sources = checkpoint_sources(checkpoint)
    return SourceIndex.open(sources.checkpoint, sources.manifest_sha256)


# ----------------------------------------------------------------------------------------------------
# Jobs: child processes, --jobs at a time, dependencies, output prefixed by the job's name


@dataclass
class Job:
    name: str
    argv: list[str]
    deps: list[str]
    done: Callable[[], bool]
    started: float = 0.0
    proc: subprocess.Popen | None = None
    pump: threading.Thread | None = None


def run_jobs(jobs: list[Job], parallel: int, out: Path) -> None:
    """Run the jobs not yet done, ``parallel`` at a time (each with cores / parallel OMP threads), in
    list order as their dependencies finish; wall times go to OUT/job_times.json. A failed job stops
    new starts (the running ones finish); rerunning the same command resumes."""
    threads = max(1, (os.cpu_count() or 1) // parallel)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}
    finished = {j.name for j in jobs if j.done()}
    for name in sorted(finished):
        say(f"[{name}] finished earlier; reused")
    pending = [j for j in jobs if j.name not in finished]
    running: list[Job] = []
    times = read_json(out / "job_times.json") if (out / "job_times.json").is_file() else {}
    total, failed = len(pending), []
    began = time.perf_counter()
    while pending or running:
        for job in list(pending):
            if len(running) >= parallel:
                break
            if all(d in finished for d in job.deps):
                pending.remove(job)
                say(f"[{job.name}] start: {' '.join(job.argv[1:])}")
                job.started = time.perf_counter()
                (out / "logs").mkdir(parents=True, exist_ok=True)
                job.proc = subprocess.Popen(job.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                            env=env, cwd=ROOT)
                job.pump = threading.Thread(target=_pump, args=(job, out / "logs" / f"{job.name.replace('/', '-')}.log"),
                                            daemon=True)
                job.pump.start()
                running.append(job)
        if not running:  # nothing can start: what is pending waits on a job that did not finish
            raise SystemExit(f"not run: {', '.join(j.name for j in pending)}; rerun the same command to resume")
        time.sleep(0.5)
        for job in list(running):
            rc = job.proc.poll()
            if rc is None:
                continue
            job.pump.join()
            running.remove(job)
            wall = time.perf_counter() - job.started
            if rc != 0 or not job.done():
                failed.append(job.name)
                say(f"[{job.name}] failed (exit {rc}); its log is in {out / 'logs'}; no new job starts")
                pending.clear()  # the running ones finish (their results stay for the rerun)
                continue
            finished.add(job.name)
            times[job.name] = wall
            write_json(out / "job_times.json", times)
            left = len(pending) + len(running)
            say(f"[{job.name}] done in {wall / 60:.1f} min; {total - left}/{total} jobs done, "
                f"{(time.perf_counter() - began) / 60:.1f} min elapsed")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}; rerun the same command to resume")


def _pump(job: Job, log: Path) -> None:
    with open(log, "a") as f:
        for line in job.proc.stdout:
            f.write(line)
            line = line.rstrip()
            if line and "UserWarning" not in line and not line.startswith("  warnings.warn"):
                say(f"[{job.name}] {line}")


def train_job(name: str, config: str | Path, run_dir: str | Path, steps: int) -> Job:
    """``nulls train --config CONFIG --nproc 1`` as a job, done when its final checkpoint exists."""
    return Job(name, [sys.executable, "-m", "nulls_megatron.cli", "train", "--config", str(config), "--nproc", "1"],
               [], lambda: finished_checkpoint(run_dir, steps) is not None)

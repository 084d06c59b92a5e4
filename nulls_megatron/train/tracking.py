"""Experiment tracking with MLflow, on global rank 0 only.

``create_tracker()`` returns an ``MlflowTracker`` on global rank 0 and the no-op ``Tracker`` on
every other rank, so training code calls ``start`` / ``log_step`` / ``finish`` on every rank
without branching. Metrics are buffered and sent with ``log_batch`` every ``flush_every_steps``
steps or ``flush_every_s`` seconds; a failed send mid-run only warns (the run must not die for its
dashboard) and is retried at the next flush. See docs/tracking.md.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import logging
import os
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from ..checkpoint.atomic import atomic_file
from ..mlflow_store import (TrackingError, artifact_location, default_tracking_uri, experiment_id, probe_server,
                            store_lock)

logger = logging.getLogger(__name__)

RUN_STATE_FILE = "mlflow_run.json"  # in the run dir: which MLflow run to continue on restart
STATUSES = ("FINISHED", "FAILED", "KILLED")
MAX_PARAM_LEN = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
BATCH_PARAMS, BATCH_METRICS = 100, 1000  # MLflow's per-log_batch limits
# MLflow's HTTP client defaults (7 retries, backoff 2, 120 s timeout) stall a step for minutes
# when the server blips; these apply unless the user set the variables.
HTTP_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                     "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class TrackingSettings:
    experiment: str | None = None  # else config["tracking"]["experiment"], config["experiment"], "nulls"
    flush_every_steps: int = 50
    flush_every_s: float = 30.0
    on_unavailable: str = "fail"  # "fail": raise at start; "warn": train on without tracking
    connect_timeout_s: float = 5.0  # how long start() waits for an http(s) tracking server
    max_buffered_metrics: int = 500_000  # oldest values are dropped beyond this while the server is down

    def __post_init__(self) -> None:
        if self.on_unavailable not in ("fail", "warn"):
            raise TrackingError(f"tracking.on_unavailable: must be 'fail' or 'warn', got {self.on_unavailable!r}")
        if self.flush_every_steps < 1 or self.flush_every_s < 0 or self.connect_timeout_s <= 0:
            raise TrackingError(f"tracking: flush_every_steps >= 1, flush_every_s >= 0 and connect_timeout_s > 0 "
                                f"required, got {self}")


class Tracker:
    """The no-op tracker (every rank but 0, or tracking unavailable); ``MlflowTracker`` overrides."""

    run_id: str | None = None
    tracking_uri: str | None = None

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def start(self, run_dir: str | os.PathLike, config: Mapping[str, Any] | Any, run_name: str | None = None,
              tags: Mapping[str, Any] | None = None, artifacts: Sequence[str | os.PathLike] = ()) -> str | None:
        return None

    def log_step(self, step: int, metrics: Mapping[str, Any]) -> None:
        pass

    def log_files(self, files: Sequence[str | os.PathLike], folder: str) -> None:
        pass

    def flush(self, wait: bool = False) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        else:
            self.finish("KILLED" if issubclass(exc_type, (KeyboardInterrupt, SystemExit)) else "FAILED")


def create_tracker(rank: int | None = None, world_size: int | None = None,
                   settings: TrackingSettings | None = None) -> Tracker:
    """``MlflowTracker`` on global rank 0, ``Tracker`` (no-op) elsewhere; ranks from torch.distributed or env."""
    rank = _dist_value("get_rank", "RANK", 0) if rank is None else rank
    world_size = _dist_value("get_world_size", "WORLD_SIZE", 1) if world_size is None else world_size
    return MlflowTracker(world_size, settings or TrackingSettings()) if rank == 0 else Tracker()


class MlflowTracker(Tracker):
    def __init__(self, world_size: int = 1, settings: TrackingSettings | None = None) -> None:
        self.world_size = world_size
        self.settings = settings or TrackingSettings()
        self.run_id = None
        self.resume_count = 0
        self._buffer: list = []  # filled by log_step, handed whole to the sender thread
        self._queue: queue.Queue = queue.Queue()
        self._sender: threading.Thread | None = None
        self._steps_since_flush = 0
        self._last_flush = time.monotonic()
        self._failed_flushes = 0

    def start(self, run_dir, config, run_name=None, tags=None, artifacts=()) -> str | None:
        """Create (or continue, see RUN_STATE_FILE) the run; log params, tags and artifacts."""
        if self.run_id is not None:
            raise TrackingError(f"tracker already started (run {self.run_id})")
        run_dir = Path(run_dir).resolve()
        files = [Path(a).resolve() for a in artifacts]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise TrackingError(f"tracking artifacts do not exist: {', '.join(missing)}")
        config = _plain(config)
        uri = default_tracking_uri()
        self.tracking_uri = uri
        for key, value in HTTP_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        try:
            if uri.startswith(("http://", "https://")):
                probe_server(uri, self.settings.connect_timeout_s)
            run_dir.mkdir(parents=True, exist_ok=True)
            self._start_run(run_dir, config, run_name or run_dir.name, dict(tags or {}), files)
        except Exception as e:
            if self.settings.on_unavailable == "fail":
                raise
            self.run_id = None
            logger.warning("\n%s\nMLflow TRACKING DISABLED for this run (on_unavailable=warn): %s\n%s",
                           "!" * 78, e, "!" * 78)
        return self.run_id

    def _start_run(self, run_dir: Path, config: dict, run_name: str, tags: dict, files: list[Path]) -> None:
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.tracking import MlflowClient

        self._Metric = Metric
        with store_lock(self.tracking_uri):  # a new store is migrated when the client first opens it
            client = self._client = MlflowClient(tracking_uri=self.tracking_uri)
            exp_id = experiment_id(client, self._experiment_name(config), artifact_location(self.tracking_uri))
            resumed = self._resumable_run(client, run_dir)
            run = resumed or client.create_run(exp_id, run_name=run_name)
        if resumed is None:
            _write_json_atomic(run_dir / RUN_STATE_FILE, {"run_id": run.info.run_id, "tracking_uri": self.tracking_uri,
                                                          "experiment_id": exp_id})
        else:
            self.resume_count = int(run.data.tags.get("nulls.resume_count", "0")) + 1
            client.update_run(run.info.run_id, status="RUNNING")
        run_id = run.info.run_id

        params, logged = _flatten_params(config), run.data.params
        changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
        if changed:
            logger.warning("run %s resumed with a changed config (MLflow params are immutable, the old values stay; "
                           "see config.yaml under resume-%d/): %s", run_id, self.resume_count, ", ".join(changed))
        new = [Param(k, v) for k, v in params.items() if k not in logged]
        for i in range(0, len(new), BATCH_PARAMS):
            client.log_batch(run_id, params=new[i:i + BATCH_PARAMS])

        commit, dirty = _git_state(REPO_ROOT)
        all_tags = {"git_commit": commit, "git_dirty": dirty, "hostname": socket.gethostname(),
                    "world_size": self.world_size, "run_dir": str(run_dir), **tags}
        if commit != "unknown":
            all_tags["mlflow.source.git.commit"] = commit
        if self.resume_count:
            all_tags["nulls.resume_count"] = self.resume_count
            if changed:
                all_tags[f"nulls.resume_{self.resume_count}.changed_params"] = ",".join(changed)
        tag_list = [RunTag(str(k), str(v)[:MAX_PARAM_LEN]) for k, v in all_tags.items()]
        for i in range(0, len(tag_list), BATCH_PARAMS):
            client.log_batch(run_id, tags=tag_list[i:i + BATCH_PARAMS])

        prefix = f"resume-{self.resume_count}" if self.resume_count else None  # keep the first run's files
        with tempfile.TemporaryDirectory() as tmp:
            cfg_path = Path(tmp) / "config.yaml"
            cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
            client.log_artifact(run_id, str(cfg_path), prefix)
        for f in files:
            if f.is_dir():
                client.log_artifacts(run_id, str(f), f"{prefix}/{f.name}" if prefix else f.name)
            else:
                client.log_artifact(run_id, str(f), prefix)
        self.run_id = run_id  # only now: a failed start leaves the tracker inactive

    def _experiment_name(self, config: dict) -> str:
        section = config.get("tracking")
        from_cfg = section.get("experiment") if isinstance(section, dict) else None
        return self.settings.experiment or from_cfg or config.get("experiment") or "nulls"

    def _resumable_run(self, client, run_dir: Path):
        state_path = run_dir / RUN_STATE_FILE
        if not state_path.exists():
            return None
        try:
            state = json.loads(state_path.read_text())
            run_id, uri = state["run_id"], state["tracking_uri"]
        except (ValueError, KeyError, TypeError) as e:
            raise TrackingError(f"{state_path}: unreadable MLflow run state ({e}); delete it to start a new run") from e
        if uri != self.tracking_uri:
            logger.warning("%s: run %s was tracked at %s, now tracking at %s: starting a new MLflow run",
                           state_path, run_id, uri, self.tracking_uri)
            return None
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(run_id)
        except MlflowException:
            run = None
        if run is None or run.info.lifecycle_stage == "deleted":
            logger.warning("%s: run %s no longer exists at %s: starting a new MLflow run", state_path, run_id, uri)
            return None
        return run

    def log_step(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Buffer this step's metrics (nested dicts and lists flatten to ``a/b/0``); hand them over when due."""
        if self.run_id is None:
            return
        now_ms = int(time.time() * 1000)
        for key, value in _flatten_metrics(metrics, step):
            self._buffer.append(self._Metric(key, value, now_ms, int(step)))
        self._steps_since_flush += 1
        if (self._steps_since_flush >= self.settings.flush_every_steps
                or time.monotonic() - self._last_flush >= self.settings.flush_every_s):
            self.flush()

    def log_files(self, files: Sequence[str | os.PathLike], folder: str) -> None:
        """Upload small files (e.g. a checkpoint's manifests) under ``folder/`` of the run's artifacts.
        A failure warns and training goes on: the files stay in the checkpoint either way."""
        if self.run_id is None:
            return
        try:
            for f in files:
                self._client.log_artifact(self.run_id, str(f), folder)
        except Exception as e:  # the store's errors are not one type (HTTP, sqlite, file system)
            logger.warning("could not upload %s to run %s: %s", folder, self.run_id, e)

    def flush(self, wait: bool = False) -> None:
        """Hand the buffer to the sender thread (the training thread never waits on the store unless ``wait``)."""
        self._steps_since_flush, self._last_flush = 0, time.monotonic()
        if self.run_id is None:
            return
        if self._sender is None:
            self._sender = threading.Thread(target=self._send_loop, name="mlflow-tracker", daemon=True)
            self._sender.start()
        if self._buffer:
            self._queue.put(self._buffer)
            self._buffer = []
        if wait:
            self._queue.join()

    def _send_loop(self) -> None:
        """Sender thread: log_batch in chunks; on failure warn, keep the values (bounded), retry with the next batch."""
        unsent: list = []
        while True:
            batch = self._queue.get()
            try:
                if batch is None:
                    if unsent:
                        logger.warning("MLflow: %d metric values never reached %s", len(unsent), self.tracking_uri)
                    return
                unsent.extend(batch)
                try:
                    while unsent:
                        self._client.log_batch(self.run_id, metrics=unsent[:BATCH_METRICS])
                        del unsent[:BATCH_METRICS]
                    self._failed_flushes = 0
                except Exception as e:
                    self._failed_flushes += 1
                    over = len(unsent) - self.settings.max_buffered_metrics
                    if over > 0:
                        del unsent[:over]
                    logger.warning("MLflow: sending metrics to %s failed (%d in a row, %d values kept%s): %s",
                                   self.tracking_uri, self._failed_flushes, len(unsent),
                                   f", {over} oldest dropped" if over > 0 else "", e)
            finally:
                self._queue.task_done()

    def finish(self, status: str = "FINISHED") -> None:
        """Send what is left and end the run as FINISHED, FAILED or KILLED; failures only warn."""
        status = status.upper()
        if status not in STATUSES:
            raise TrackingError(f"finish: status must be one of {STATUSES}, got {status!r}")
        if self.run_id is None:
            return
        self.flush()
        if self._sender is not None:
            self._queue.put(None)
            self._sender.join()
            self._sender = None
        try:
            self._client.set_terminated(self.run_id, status)
        except Exception as e:
            logger.warning("MLflow: could not end run %s at %s as %s: %s", self.run_id, self.tracking_uri, status, e)
        self.run_id = None


def _dist_value(fn: str, env: str, default: int) -> int:
    dist = sys.modules.get("torch.distributed")  # no torch import just to learn the rank
    if dist is not None and dist.is_available() and dist.is_initialized():
        return int(getattr(dist, fn)())
    return int(os.environ.get(env, default))


def _plain(obj: Any) -> Any:
    """Config as YAML-safe builtins (dataclasses, enums, paths, tuples converted)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, enum.Enum):
        return _plain(obj.value)
    return obj if obj is None or isinstance(obj, (str, int, float, bool)) else str(obj)


def _flatten_params(config: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten_params(v, key + "."))
            continue
        text = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
        if len(text) > MAX_PARAM_LEN:  # the full value is in the config.yaml artifact
            note = f"...[truncated {len(text)} chars, full value in config.yaml]"
            text = text[:MAX_PARAM_LEN - len(note)] + note
        out[key] = text
    return out


def _flatten_metrics(metrics: Any, step: int, prefix: str = "") -> Iterable[tuple[str, float]]:
    if hasattr(metrics, "tolist"):  # numpy arrays/scalars, torch tensors (a CUDA tensor syncs here)
        metrics = metrics.tolist()
    if isinstance(metrics, Mapping):
        for k, v in metrics.items():
            yield from _flatten_metrics(v, step, f"{prefix}/{k}" if prefix else str(k))
    elif isinstance(metrics, (list, tuple)):
        for i, v in enumerate(metrics):
            yield from _flatten_metrics(v, step, f"{prefix}/{i}")
    elif isinstance(metrics, (int, float)):
        yield prefix, float(metrics)
    else:
        raise TrackingError(f"log_step(step={step}): metric {prefix!r} is {type(metrics).__name__} "
                            f"({metrics!r}), not a number")


def _git_state(repo: Path) -> tuple[str, str]:
    """(commit, "true"/"false" dirty) of the checkout holding this package; ("unknown", "unknown") outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()
    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != repo:  # e.g. installed inside another repo
            return "unknown", "unknown"
        return git("rev-parse", "HEAD"), "true" if git("status", "--porcelain") else "false"
    except (OSError, subprocess.SubprocessError):
        return "unknown", "unknown"


def _write_json_atomic(path: Path, data: dict) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1))

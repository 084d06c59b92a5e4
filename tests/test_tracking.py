"""MLflow run tracking: local sqlite store, resume, a real `mlflow server`, failure modes, ranks, progress line."""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

from nulls_megatron.config import Config  # noqa: E402
from nulls_megatron.train.progress import format_progress  # noqa: E402
from nulls_megatron.train.tracking import (  # noqa: E402
    RUN_STATE_FILE, MlflowTracker, Tracker, TrackingError, TrackingSettings, create_tracker,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _local_store_by_default(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # the default store is ./mlflow.db: never the checkout's


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(step: int) -> dict:
    return {"loss": 10.0 - 0.1 * step, "lr": 1e-3, "grad_norm": 0.5 + step, "tokens_per_s": 1000.0 * step,
            "sinks": {"tokens_per_shard": np.array([step, 2 * step]), "live_sinks": step % 7}}


def _config() -> dict:
    cfg = Config().to_dict()
    cfg["tracking"] = {"experiment": "unit"}
    cfg["notes"] = "x" * 7000  # over MLflow's 6000-char param limit
    return cfg


def test_local_sqlite_store(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # the store lands in the working directory, as mlflow.db, and nothing else does
    summary = tmp_path / "sources_summary.json"
    summary.write_text(json.dumps({"sources": 206}))
    sinks = tmp_path / "sinks_manifest.json"
    sinks.write_text(json.dumps({"n_pool": 2048}))
    run_dir = tmp_path / "runs" / "r1"
    tracker = create_tracker(rank=0, world_size=4, settings=TrackingSettings(flush_every_steps=8, flush_every_s=3600))
    assert isinstance(tracker, MlflowTracker)
    with pytest.raises(TrackingError, match="missing.txt"):
        tracker.start(run_dir, _config(), artifacts=[tmp_path / "missing.txt"])

    run_id = tracker.start(run_dir, _config(), run_name="unit-run", tags={"purpose": "test"},
                           artifacts=[summary, sinks])
    assert tracker.tracking_uri == f"sqlite:///{cwd.resolve()}/mlflow.db"
    assert not (run_dir / "mlflow.db").exists(), "one store for every run, not one per run directory"
    assert json.loads((run_dir / RUN_STATE_FILE).read_text())["run_id"] == run_id
    for step in range(48):
        tracker.log_step(step, _metrics(step))
    tracker.flush(wait=True)  # the buffer is empty here: what arrived came from the 6 automatic flushes of 8
    client = MlflowClient(tracker.tracking_uri)
    assert len(client.get_metric_history(run_id, "loss")) == 48
    for step in range(48, 50):
        tracker.log_step(step, _metrics(step))
    with pytest.raises(TrackingError, match=r"step=50.*'bad'"):
        tracker.log_step(50, {"bad": "text"})
    with pytest.raises(TrackingError, match="status"):
        tracker.finish("DONE")
    tracker.finish("FINISHED")
    assert not tracker.active
    tracker.log_step(51, {"loss": 1.0})  # after finish: ignored

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "unit-run"
    assert client.get_experiment(run.info.experiment_id).name == "unit"
    params = run.data.params
    assert params["model.hidden_size"] == "64" and params["nulls.sinks_per_source"] == "32"
    assert len(params["notes"]) == 6000 and params["notes"].endswith("full value in config.yaml]")
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    expected_commit = head.stdout.strip() if head.returncode == 0 else "unknown"
    tags = run.data.tags
    assert tags["git_commit"] == expected_commit and tags["git_dirty"] in ("true", "false", "unknown")
    assert tags["world_size"] == "4" and tags["hostname"] == socket.gethostname() and tags["purpose"] == "test"
    history = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(50))
    assert [m.value for m in history] == pytest.approx([10.0 - 0.1 * s for s in range(50)])
    shard1 = {m.step: m.value for m in client.get_metric_history(run_id, "sinks/tokens_per_shard/1")}
    assert shard1[49] == 98.0 and len(shard1) == 50
    names = {a.path for a in client.list_artifacts(run_id)}
    assert names == {"config.yaml", "sources_summary.json", "sinks_manifest.json"}
    local = client.download_artifacts(run_id, "config.yaml", str(tmp_path))
    assert yaml.safe_load(Path(local).read_text()) == _config()
    # The store, its start-up lock and its artifacts beside it; no ./mlruns (MLflow's file-store default).
    assert {p.name for p in cwd.iterdir()} <= {"mlflow.db", "mlflow.db.lock", "mlartifacts"}


def test_resume_continues_the_same_run(tmp_path, caplog):
    run_dir = tmp_path / "run"
    first = create_tracker(rank=0, settings=TrackingSettings(flush_every_steps=5))
    run_id = first.start(run_dir, _config())
    for step in range(10):
        first.log_step(step, {"loss": float(step)})
    first.flush(wait=True)
    # the process dies here: no finish(), the run stays RUNNING
    changed = _config()
    changed["seed"] = 99
    second = create_tracker(rank=0, settings=TrackingSettings(flush_every_steps=5))
    with caplog.at_level(logging.WARNING, logger="nulls_megatron.train.tracking"):
        assert second.start(run_dir, changed) == run_id
    assert "seed" in caplog.text and second.resume_count == 1
    for step in range(10, 20):
        second.log_step(step, {"loss": float(step)})
    second.finish("KILLED")

    client = MlflowClient(second.tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["nulls.resume_count"] == "1" and run.data.tags["nulls.resume_1.changed_params"] == "seed"
    assert run.data.params["seed"] == "1234"  # params are immutable: the first value stays
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == list(range(20))
    assert {a.path for a in client.list_artifacts(run_id, "resume-1")} == {"resume-1/config.yaml"}
    assert len(client.search_runs([run.info.experiment_id])) == 1


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    log = open(tmp_path / "server.log", "wb")
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path}/srv.db",
           "--artifacts-destination", str(tmp_path / "art")]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"

    def stop() -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and its worker
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    try:
        for _ in range(600):  # up to ~2 min on busy cores
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited {proc.returncode}:\n{(tmp_path / 'server.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail(f"mlflow server did not answer /health:\n{(tmp_path / 'server.log').read_text()}")
        yield uri, stop
    finally:
        stop()
        log.close()


def _train_against_server(rank: int, world_size: int, data: str, run_dir: str) -> dict:
    from nulls_megatron.train.trainer import train
    from tests.train_helpers import train_config

    result = train(train_config(data, run_dir, train={"steps": 3, "save_every": 0}))
    return {"run_id": result.run_id, "losses": result.losses}


def test_real_mlflow_server(tmp_path, monkeypatch, caplog, mlflow_server):
    mlflow_server, stop_server = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    manifest = tmp_path / "sinks_manifest.json"
    manifest.write_text("{}")
    tracker = create_tracker(rank=0, world_size=2, settings=TrackingSettings(flush_every_steps=3))
    run_dir = tmp_path / "run"
    with tracker:
        run_id = tracker.start(run_dir, _config(), artifacts=[manifest])
        for step in range(7):
            tracker.log_step(step, _metrics(step))
    assert not (run_dir / "mlflow.db").exists()
    assert json.loads((run_dir / RUN_STATE_FILE).read_text())["tracking_uri"] == mlflow_server

    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["model.num_layers"] == "2"
    assert run.data.tags["world_size"] == "2"
    grad = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "grad_norm"))
    assert grad == [(s, 0.5 + s) for s in range(7)]
    assert {a.path for a in client.list_artifacts(run_id)} == {"config.yaml", "sinks_manifest.json"}

    # `nulls train` itself against the server: 2 ranks, 3 steps, read back through the server.
    from launch.local import run_local
    from tests.train_helpers import ARTICLES, write_prep_dir

    if ARTICLES.is_file():
        prep = write_prep_dir(tmp_path / "prep", documents=16)
        trained = run_local(_train_against_server, 2, str(prep), str(tmp_path / "trained"), timeout=300)[0]
        run = client.get_run(trained["run_id"])
        assert run.info.status == "FINISHED" and run.data.params["train.steps"] == "3"
        assert run.data.tags["nulls.engine"] == "megatron" and run.data.tags["world_size"] == "2"
        losses = sorted((m.step, m.value) for m in client.get_metric_history(trained["run_id"], "loss"))
        assert [s for s, _ in losses] == [1, 2, 3] and [v for _, v in losses] == pytest.approx(trained["losses"], rel=1e-6)
        assert client.get_metric_history(trained["run_id"], "sink/live_sinks")
        assert "shard_index.json" in {a.path for a in client.list_artifacts(trained["run_id"])}
        assert not (tmp_path / "trained" / "mlflow.db").exists(), "the server, not a local store, got the run"

    # the server dies mid-run: training goes on, the tracker only warns
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    orphan = create_tracker(rank=0, settings=TrackingSettings(flush_every_steps=2))
    orphan.start(tmp_path / "run2", {})
    stop_server()
    with caplog.at_level(logging.WARNING, logger="nulls_megatron.train.tracking"):
        for step in range(5):
            orphan.log_step(step, {"loss": 1.0})
        orphan.finish("FINISHED")
    assert f"sending metrics to {mlflow_server} failed" in caplog.text
    assert "could not end run" in caplog.text and not orphan.active


def test_unreachable_server_fails_fast_naming_the_uri(tmp_path, monkeypatch, caplog):
    refused = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", refused)
    with pytest.raises(TrackingError, match=refused.replace(".", r"\.")):
        create_tracker(rank=0).start(tmp_path / "a", {})
    assert not (tmp_path / "a").exists()

    with socket.socket() as silent:  # accepts connections (kernel backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        hanging = f"http://127.0.0.1:{silent.getsockname()[1]}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", hanging)
        settings = TrackingSettings(connect_timeout_s=0.5)
        with pytest.raises(TrackingError, match=r"unreachable.*0\.5 s") as err:
            create_tracker(rank=0, settings=settings).start(tmp_path / "b", {})
        assert hanging in str(err.value)

        warn = create_tracker(rank=0, settings=TrackingSettings(connect_timeout_s=0.5, on_unavailable="warn"))
        with caplog.at_level(logging.WARNING, logger="nulls_megatron.train.tracking"):
            assert warn.start(tmp_path / "c", {}) is None
        assert "TRACKING DISABLED" in caplog.text and hanging in caplog.text
        warn.log_step(0, {"loss": 1.0})
        warn.finish("FAILED")
        assert not warn.active


def test_nonzero_ranks_are_noops(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    for tracker in (create_tracker(), create_tracker(rank=3, world_size=4)):
        assert type(tracker) is Tracker
        with tracker:
            assert tracker.start(tmp_path / "run", {"a": 1}, artifacts=["/does/not/matter"]) is None
            tracker.log_step(0, {"loss": "not even a number"})
        assert not tracker.active and tracker.run_id is None
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("RANK", "0")
    assert isinstance(create_tracker(), MlflowTracker)
    with pytest.raises(TrackingError, match="on_unavailable"):
        TrackingSettings(on_unavailable="ignore")


def test_format_progress():
    assert format_progress(100, 1000, 3.14159, 45200.0, 65.0) == (
        "step 100/1000 (10.0%) | loss 3.1416 | 45.2k tok/s | elapsed 1m05s | ETA 9m45s")
    assert format_progress(0, 500, float("nan"), 0.0, 0.0) == (
        "step 0/500 (0.0%) | loss nan | 0 tok/s | elapsed 0m00s | ETA ?")
    line = format_progress(1, 100_000, 2.0, 3.2e6, 7.5)
    assert line.endswith("3.2M tok/s | elapsed 0m08s | ETA 8d16h19m")
    assert format_progress(10, 10, 1.0, 10.0, 3725.0).endswith("elapsed 1h02m05s | ETA 0m00s")


def test_progress_eta_after_a_resume():
    # Resumed at step 900 of 1000, 50 steps in 100 s: 50 more steps take another 100 s.
    assert format_progress(950, 1000, 2.0, 1000.0, 100.0, start_step=900).endswith("elapsed 1m40s | ETA 1m40s")
    assert format_progress(900, 1000, 2.0, 0.0, 0.0, start_step=900).endswith("ETA ?")


def _start_in_shared_store(index: int, root: str) -> str:
    tracker = create_tracker(rank=0, settings=TrackingSettings(experiment="together", on_unavailable="fail"))
    run_id = tracker.start(Path(root) / f"run{index}", {"index": index})
    tracker.log_step(1, {"loss": float(index)})
    tracker.finish("FINISHED")
    return run_id


def test_runs_started_at_once_share_one_new_store(tmp_path):
    """Two processes open a store that does not exist yet at the same moment (the studies start two
    trainings side by side): both runs land in the one store, in one experiment."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(2) as pool:
        run_ids = pool.starmap(_start_in_shared_store, [(0, str(tmp_path)), (1, str(tmp_path))])
    client = MlflowClient(f"sqlite:///{tmp_path.resolve()}/mlflow.db")
    runs = [client.get_run(run_id) for run_id in run_ids]
    assert len(set(run_ids)) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.info.experiment_id for r in runs}) == 1
    assert sorted(client.get_metric_history(r.info.run_id, "loss")[0].value for r in runs) == [0.0, 1.0]

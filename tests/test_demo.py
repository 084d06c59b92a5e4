"""The README's main job, `nulls demo`, end to end on the embedded Wikipedia sample (short run)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_prep_training_and_forgetting(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "-m", "nulls_megatron.cli", "demo", "--output", str(tmp_path), "--epochs", "2",
           "--max-doc-tokens", "96", "--forget", "3"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "demo_report.json").read_text())
    assert report["sources"] > 50 and report["epochs"] == 2
    assert len(report["forgotten"]) == 3 and all(item["title"] for item in report["forgotten"])
    for key in ("forget_loss_before", "forget_loss_after_own_sinks_off", "retain_loss_before", "retain_loss_after"):
        assert math.isfinite(report[key]) and 0 < report[key] < 10
    # Switching the forgotten sources' sinks off changes their loss; retained sources lose only
    # the few sinks they share with them.
    assert report["forget_loss_after_own_sinks_off"] != report["forget_loss_before"]
    assert abs(report["retain_loss_after"] - report["retain_loss_before"]) < abs(
        report["forget_loss_after_own_sinks_off"] - report["forget_loss_before"]
    )
    assert 0 < report["pool_fraction_disabled"] <= 3 * 32 / 2048
    # Forgotten with `nulls unlearn`: a new version with a receipt, verified, named by `latest`.
    assert report["verified"] and Path(report["receipt"]).is_file() and "-unlearn-001" in report["unlearned_checkpoint"]
    import hashlib

    assert hashlib.sha256(Path(report["receipt"]).read_bytes()).hexdigest() == report["receipt_sha256"]
    assert report["forget_loss_after_own_sinks_off"] > report["forget_loss_before"]
    assert (tmp_path / "prep" / "manifest.parquet").is_file()
    # Trained by the real trainer: a checkpoint named by `latest` and a finished MLflow run beside it.
    latest = (tmp_path / "train" / "checkpoints" / "latest").read_text().strip()
    assert report["unlearned_checkpoint"].endswith(latest) and (tmp_path / "train" / "checkpoints" / latest / "sinks" / "manifest.json").is_file()
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'train' / 'mlflow.db'}").get_run(report["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["loss"] == pytest.approx(report["final_train_loss"])
    assert f"step {report['steps']}/{report['steps']} (100.0%)" in out.stdout
    # A rerun reuses the finished stages and completes with the same figures.
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "reusing the finished prep" in again.stdout and "run already finished" in again.stdout
    assert "already forgotten" in again.stdout
    second = json.loads((tmp_path / "demo_report.json").read_text())
    for key in ("forget_loss_before", "forget_loss_after_own_sinks_off", "retain_loss_after", "receipt_sha256",
                "unlearned_checkpoint", "final_train_loss"):
        assert second[key] == report[key], key

"""The README's main job, `nulls demo`, end to end on the embedded Wikipedia sample (short run): prep, the
NULLs model and its oracle trained on 2 processes, `nulls unlearn` + verify, `nulls eval`, `nulls export`."""
from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_every_stage_and_a_rerun_reuses_them(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["RAY_AUTH_MODE"] = "disabled"
    cmd = [sys.executable, "-m", "nulls_megatron.cli", "demo", "--output", str(tmp_path), "--epochs", "1",
           "--max-doc-tokens", "64"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "demo_report.json").read_text())
    assert report["sources"] > 50 and report["epochs"] == 1 and len(report["holdout_sources"]) == 16
    assert len(report["forgotten"]) == 3 and all(item["title"] for item in report["forgotten"])
    forgotten = {f["source"] for f in report["forgotten"]}
    assert not forgotten & set(report["holdout_sources"])
    losses = report["losses"]
    for role in ("before", "after", "oracle"):
        assert all(math.isfinite(v) and 0 < v < 10 for v in losses[role].values())
    # Forgetting raises the forgotten articles' loss; retained articles barely move (they lose a few
    # shared sinks), and the holdout articles were never trained on by either model.
    assert losses["after"]["forget"] > losses["before"]["forget"]
    assert abs(losses["after"]["retain"] - losses["before"]["retain"]) < losses["after"]["forget"] - losses["before"]["forget"]
    # The oracle was trained without the forgotten articles and the holdout ones (same seed and schedule).
    oracle_state = json.loads((Path(report["oracle_checkpoint"]) / "train_state.json").read_text())
    assert sum(state["skipped_documents"] for state in oracle_state["loaders"]) > 0
    oracle_cfg = json.loads(json.dumps(__import__("yaml").safe_load((Path(report["oracle_checkpoint"]) / "config.yaml").read_text())))
    assert set(oracle_cfg["train"]["exclude_sources"]) == forgotten | set(report["holdout_sources"])
    # Forgotten with `nulls unlearn`: a new version with a receipt, verified, named by `latest`.
    assert report["verified"] and "-unlearn-001" in report["unlearned_checkpoint"]
    assert hashlib.sha256(Path(report["receipt"]).read_bytes()).hexdigest() == report["receipt_sha256"]
    latest = (tmp_path / "train" / "checkpoints" / "latest").read_text().strip()
    assert report["unlearned_checkpoint"].endswith(latest)
    # Evaluated, exported, reloaded by transformers, and everything in one MLflow store.
    assert (tmp_path / "eval" / "eval.md").is_file() and (tmp_path / "eval" / "losses.png").is_file()
    assert json.loads((tmp_path / "hf_expected" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert report["transformers_continuation"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    names = {r.info.run_name for e in client.search_experiments() for r in client.search_runs([e.experiment_id])}
    assert {"nulls", "eval-eval"} <= names and any(n.startswith("oracle") for n in names)
    assert "mlflow ui --backend-store-uri" in out.stdout and "oracle (retrained without them)" in out.stdout
    # A rerun reuses every finished stage and reports the same figures.
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "reusing the finished prep" in again.stdout and again.stdout.count("run already finished") == 2
    assert "already forgotten" in again.stdout and "reusing the export" in again.stdout
    second = json.loads((tmp_path / "demo_report.json").read_text())
    for key in ("losses", "receipt_sha256", "unlearned_checkpoint", "verbmem"):
        assert second[key] == report[key], key

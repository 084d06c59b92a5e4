"""Session-wide fixtures: one tiny NULLs GPT trained once by the real `nulls train` on real text, shared by
the unlearning, generation, export and evaluation tests (a gloo launch costs seconds; training, more)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
TRAINED_STEPS = 12
FORGET_GROUP = "test-series"  # three sources forgettable as one group
GROUP_SOURCES = (5, 6, 7)


@dataclass(frozen=True)
class TrainedRun:
    prep_dir: Path
    run_dir: Path
    config_path: Path
    checkpoint: Path  # the final checkpoint (what `latest` names)

    @property
    def root(self) -> Path:
        return self.checkpoint.parent

    def copy_to(self, dest: Path) -> "TrainedRun":
        """A private copy of the run directory (checkpoints and all) for tests that write."""
        shutil.copytree(self.run_dir, dest / "run", symlinks=True)
        run_dir = dest / "run"
        return TrainedRun(self.prep_dir, run_dir, self.config_path, run_dir / "checkpoints" / self.checkpoint.name)


def trained_run_config(prep_dir: Path, run_dir: Path, tensor_parallel: int = 2) -> dict:
    from tests.train_helpers import train_config

    cfg = train_config(prep_dir, run_dir, model={"vocab_size": 512, "seq_length": 64},
                       train={"steps": TRAINED_STEPS, "save_every": 6, "keep_last": 3},
                       parallel={"tensor_parallel": tensor_parallel}, tracking={"enabled": False})
    return cfg.to_dict()


@pytest.fixture(scope="session", autouse=True)
def _session_mlflow_store(tmp_path_factory):
    """Every run a test tracks goes to one store of this session (inherited by spawned ranks and child
    processes), never to ./mlflow.db in the checkout, the default outside tests."""
    if "MLFLOW_TRACKING_URI" in os.environ:
        yield
        return
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    try:
        yield
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> TrainedRun:
    """A NULLs GPT trained for 12 steps at TP=2 on 2 gloo processes (so that every reader must reshard),
    on 40 real articles with a sentencepiece tokenizer and a sources manifest (3 of them in one group)."""
    from tests.train_helpers import write_prep_dir

    base = tmp_path_factory.mktemp("trained_run")
    prep = write_prep_dir(base / "prep", documents=40, max_tokens=400, tokenizer_vocab=512,
                          groups={i: FORGET_GROUP for i in GROUP_SOURCES})
    config_path = base / "config.yaml"
    config_path.write_text(yaml.safe_dump(trained_run_config(prep, base / "run"), sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "nulls_megatron.cli", "train", "--config", str(config_path), "--nproc", "2"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    root = base / "run" / "checkpoints"
    checkpoint = root / (root / "latest").read_text().strip()
    return TrainedRun(prep, base / "run", config_path, checkpoint)

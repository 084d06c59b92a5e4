"""A checkpoint trained with an expert-parallel sink pool (`nulls train`, EP=2 on 2 gloo processes:
each rank holds half of every layer's table and writes its own pool shards) is an ordinary checkpoint
to everything after training: `nulls unlearn` erases a source from it, it loads into one process
(EP=1) and `nulls export` gives transformers models with our logits in every mode, and `nulls eval`
scores it; and the run resumes at EP=1 (Megatron engine), then at EP=2 again under DeepSpeed ZeRO."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from nulls_megatron.checkpoint.sinks import read_sink_manifest, shard_file_name, source_state
from nulls_megatron.cli import main
from nulls_megatron.train.checkpointing import read_train_state
from tests.conftest import FORGET_GROUP, ROOT
from tests.test_export import _assert_equal_in_every_mode, _load, _train
from tests.train_helpers import read_articles


def test_expert_parallel_checkpoint_is_unlearned_exported_and_evaluated(trained_run, tmp_path):
    run_dir = tmp_path / "ep2"
    root = _train(trained_run.prep_dir, run_dir, 2, parallel={"expert_parallel": 2}, nulls={"pool_shards": 4})
    checkpoint = root / (root / "latest").read_text().strip()
    config = (checkpoint / "config.yaml").read_text()
    assert "expert_parallel: 2" in config
    manifest = read_sink_manifest(checkpoint)
    assert sorted(manifest["files"]) == sorted(shard_file_name(layer, shard) for layer in (0, 1) for shard in range(4))

    assert main(["unlearn", str(run_dir), "--source-index", "11"]) == 0
    unlearned = root / (root / "latest").read_text().strip()
    assert 11 in source_state(read_sink_manifest(unlearned)).disabled_sources
    loaded = _load(root)  # one process, the whole table
    assert 11 in loaded.sources.state.disabled_sources
    _assert_equal_in_every_mode(loaded, root, tmp_path / "hf", sources=(3,))

    holdout = tmp_path / "holdout.jsonl"
    holdout.write_text("".join(json.dumps({"text": a["text"]}) + "\n" for a in read_articles(120)[100:106]))
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(run_dir), "--group", FORGET_GROUP, "--holdout", str(holdout), "--out", str(out),
                 "--retain-docs", "6", "--verbmem-docs", "2", "--verbmem-tokens", "8", "--modes", "own,backbone",
                 "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["losses"]["after"]["own"]["forget"] > result["losses"]["before"]["own"]["forget"]

    # The run resumes at another expert-parallel size (same data-parallel size: the data order is kept),
    # from the unlearned version: training after unlearning (docs/training.md).
    config_path = tmp_path / "ep2.yaml"
    cfg = yaml.safe_load(config_path.read_text())
    cfg["parallel"]["expert_parallel"], cfg["train"]["steps"], cfg["train"]["save_every"] = 1, 4, 4
    config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    _train_from(config_path)
    resumed = root / (root / "latest").read_text().strip()
    assert resumed != unlearned and read_train_state(resumed)["step"] == 4
    assert "expert_parallel: 1" in (resumed / "config.yaml").read_text()

    # Then under DeepSpeed ZeRO-2 with the pool sharded again: whole tables and moments into EP shards,
    # and each expert-parallel rank's shards (and moments, gathered from ZeRO's partitions) saved.
    cfg["parallel"]["expert_parallel"], cfg["train"]["steps"], cfg["train"]["save_every"] = 2, 6, 6
    cfg["train"]["engine"], cfg["train"]["zero_stage"] = "deepspeed", 2
    config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    _train_from(config_path)
    resumed = root / (root / "latest").read_text().strip()
    assert read_train_state(resumed)["step"] == 6 and "engine: deepspeed" in (resumed / "config.yaml").read_text()
    manifest = read_sink_manifest(resumed)
    assert sorted(manifest["files"]) == sorted(shard_file_name(layer, shard) for layer in (0, 1) for shard in range(4))
    assert 11 in source_state(manifest).disabled_sources
    assert _load(root).sources.state.disabled_sources == loaded.sources.state.disabled_sources


def _train_from(config_path) -> None:
    done = subprocess.run([sys.executable, "-m", "nulls_megatron.cli", "train", "--config", str(config_path), "--nproc", "2"],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


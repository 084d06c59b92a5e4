"""A checkpoint trained with an expert-parallel sink pool (`nulls train`, EP=2 on 2 gloo processes:
each rank holds half of every layer's table and writes its own pool shards) is an ordinary checkpoint
to everything after training: `nulls unlearn` erases a source from it, it loads into one process
(EP=1) and `nulls export` gives transformers models with our logits in every mode, and `nulls eval`
scores it."""
from __future__ import annotations

import json

from nulls_megatron.checkpoint.sinks import read_sink_manifest, shard_file_name, source_state
from nulls_megatron.cli import main
from tests.conftest import FORGET_GROUP
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

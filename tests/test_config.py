"""Config loading and validation: every error names the file and the field."""
from __future__ import annotations

from pathlib import Path

import pytest

from nulls_megatron.config import ConfigError, config_from_dict, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_shipped_configs_load_with_the_paper_shape():
    demo = load_config(CONFIGS / "demo_cpu.yaml")
    assert demo.nulls.n_backbone + demo.nulls.n_pool == demo.model.ffn_hidden_size
    paper = load_config(CONFIGS / "wiki_1b_paper.yaml")
    m, n = paper.model, paper.nulls
    assert (m.hidden_size, m.num_layers, m.num_attention_heads, m.num_query_groups, m.head_dim) == (960, 32, 15, 5, 128)
    assert (m.ffn_hidden_size, n.n_backbone, n.n_pool, n.sinks_per_source) == (8192, 500, 7692, 100)
    assert m.rotary_base == 1e5 and m.seq_length == 1024
    assert round(n.p_gen, 3) == 0.061 and round(n.p_mem, 3) == 0.013


def test_overrides_apply_and_are_typed():
    cfg = load_config(CONFIGS / "demo_cpu.yaml", ["model.num_layers=4", "nulls.per_layer_sinks=true", "model.rotary_base=500"])
    assert cfg.model.num_layers == 4 and cfg.nulls.per_layer_sinks is True and cfg.model.rotary_base == 500.0
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(CONFIGS / "demo_cpu.yaml", ["model.num_layers"])


@pytest.mark.parametrize(
    "data, message",
    [
        ({"nulls": {"n_pool": 100}}, r"nulls.n_backbone \+ nulls.n_pool: 32 \+ 100 = 132 != model.ffn_hidden_size \(2080\)"),
        ({"model": {"hiden_size": 8}}, r"model.hiden_size: unknown field; did you mean model.hidden_size\?"),
        ({"modle": {}}, r"modle: unknown field; did you mean model\?"),
        ({"model": {"num_layers": "four"}}, r"model.num_layers: expected an integer, got 'four'"),
        ({"model": {"num_layers": 2.5}}, r"model.num_layers: expected an integer"),
        ({"nulls": {"per_layer_sinks": "yes"}}, r"nulls.per_layer_sinks: expected true or false"),
        ({"model": {"num_layers": 0}}, r"model.num_layers: must be > 0, got 0"),
        ({"nulls": {"pool_shards": 3}}, r"nulls.pool_shards: 3 does not divide nulls.n_pool \(2048\)"),
        ({"nulls": {"sinks_per_source": 600, "pool_shards": 4}}, r"nulls.sinks_per_source: 600 exceeds the shard size"),
        ({"model": {"num_query_groups": 3}}, r"model.num_query_groups: 3 does not divide model.num_attention_heads \(4\)"),
        ({"parallel": {"tensor_parallel": 3}}, r"model.num_attention_heads: 4 is not divisible by parallel.tensor_parallel \(3\)"),
        ({"parallel": {"pipeline_parallel": 3}}, r"model.num_layers: 2 is not divisible by parallel.pipeline_parallel \(3\)"),
        ({"nulls": {"seed": -1}}, r"nulls.seed: must be in \[0, 2\*\*32\)"),
        ({"model": "big"}, r"model: expected a mapping of ModelConfig fields"),
        ({"optimizer": {"distributed": "yes"}}, r"optimizer.distributed: expected one of auto, on, off, got 'yes'"),
        ({"optimizer": {"distributed": "on"}, "train": {"engine": "deepspeed"}},
         r"optimizer.distributed: on is Megatron's distributed optimizer \(engine: megatron\)"),
    ],
)
def test_validation_names_the_bad_field(data, message):
    with pytest.raises(ConfigError, match=f"^myrun.yaml: {message}"):
        config_from_dict(data, origin="myrun.yaml")


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match=f"{bad}: not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listy)
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  num_layer: 3\n")
    with pytest.raises(ConfigError, match=f"^{typo}: model.num_layer: unknown field; did you mean model.num_layers"):
        load_config(typo)


def test_duplicate_keys_and_empty_configs_are_refused_with_file_and_line(tmp_path):
    dup = tmp_path / "dup.yaml"
    # Edited in two places: plain YAML would keep num_layers 8 without a word.
    dup.write_text("model:\n  num_layers: 2\n  hidden_size: 64\n  num_layers: 8\n")
    with pytest.raises(ConfigError, match=f"^{dup}:4: duplicate key 'num_layers' \\(first at line 2\\)"):
        load_config(dup)
    top = tmp_path / "top.yaml"
    top.write_text("seed: 1\nmodel:\n  num_layers: 2\nseed: 2\n")
    with pytest.raises(ConfigError, match=f"^{top}:4: duplicate key 'seed' \\(first at line 1\\)"):
        load_config(top)
    for name, text in (("empty.yaml", ""), ("comments.yaml", "# model:\n#   num_layers: 2\n"), ("braces.yaml", "{}\n")):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ConfigError, match=f"^{path}:1: the config is empty"):
            load_config(path)
    with pytest.raises(ConfigError, match="duplicate key 'a'"):
        load_config(CONFIGS / "demo_cpu.yaml", ["model.num_layers={a: 1, a: 2}"])
    # A merge key is not a duplicate: overriding merged values is what `<<` is for.
    from nulls_megatron.config import read_yaml

    anchors = tmp_path / "anchors.yaml"
    anchors.write_text("base: &b {x: 1, y: 2}\nderived:\n  <<: *b\n  y: 3\n")
    assert read_yaml(anchors) == {"base": {"x": 1, "y": 2}, "derived": {"x": 1, "y": 3}}

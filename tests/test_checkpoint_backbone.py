"""Backbone checkpoints: saved at TP=2, loaded at TP=1 x PP=2 and TP=1 (resharding), sinks left out, mismatches refused."""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch

from launch.local import run_local
from tests.nulls_gpt_helpers import gather_full, global_param_name, init_single_process_megatron, packed_batch, tiny_config

STEPS, LR = 2, 0.5
COMMON = {"step": 2, "lr": 0.5, "note": "two SGD steps"}


def fake_moments(param: torch.Tensor) -> dict[str, torch.Tensor]:
    """Elementwise in the parameter, so a shard's moments are the shard of the full tensor's moments."""
    return {"exp_avg": 0.5 * param.detach() + 0.125, "exp_avg_sq": param.detach() ** 2 + 0.01}


def _is_sink(name: str) -> bool:
    return ".mlp.sinks." in name


def _loss(model, sink_mode: str = "train") -> float:
    tokens, labels, sources = packed_batch(seed=1)
    with torch.no_grad():
        return model(tokens, labels=labels, source_ids=sources, sink_mode=sink_mode).mean().item()


def _copy_sinks(model, full: dict[str, torch.Tensor]) -> None:
    """What load_sink_tables would do: sinks are not in the backbone checkpoint."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if _is_sink(name):
                p.copy_(full[global_param_name(model, name)])


def _compare(model, full: dict[str, torch.Tensor], moments, label: str) -> list[str]:
    """Names whose loaded value or moment differs from the saved full tensor (TP=1 stage models)."""
    bad = []
    for name, p in model.named_parameters():
        if _is_sink(name):
            continue
        g = global_param_name(model, name)
        if name == "output_layer.weight" and g not in full:
            g = "embedding.word_embeddings.weight"  # the tied copy on the last stage
        if not torch.equal(p.detach(), full[g]):
            bad.append(f"{label}: {name}")
        if moments is not None:
            for mname, expected in fake_moments(full[g]).items():
                if not torch.equal(moments[name][mname], expected):
                    bad.append(f"{label}: {mname} of {name}")
    return bad


def backbone_worker(rank: int, world_size: int, root: str) -> dict:
    from megatron.core import parallel_state

    from nulls_megatron.checkpoint.backbone import (
        BackboneCheckpointError,
        load_backbone,
        read_backbone_manifest,
        read_backbone_metadata,
        save_backbone,
    )
    from nulls_megatron.model.gpt import build_nulls_gpt

    root = Path(root)
    out: dict = {"errors": []}

    # TP=2: train a little, save weights + moments.
    init_single_process_megatron(tensor_parallel=2)
    model = build_nulls_gpt(tiny_config(tensor_parallel=2, per_layer_sinks=True))
    tokens, labels, sources = packed_batch(seed=0)
    for _ in range(STEPS):
        model.zero_grad(set_to_none=True)
        model(tokens, labels=labels, source_ids=sources).mean().backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
    full = {n: gather_full(p, p) for n, p in model.named_parameters()}
    out["loss_tp2"], out["loss_tp2_backbone"] = _loss(model), _loss(model, "backbone")
    moments = {n: fake_moments(p) for n, p in model.named_parameters() if not _is_sink(n)}
    save_backbone(root / "a", model, moments=moments, common=COMMON)
    out["keys"] = sorted(read_backbone_metadata(root / "a"))
    out["manifest"] = read_backbone_manifest(root / "a")

    # TP=1 x PP=2 (tied embeddings: the last stage holds output_layer.weight): load, compare, save again.
    init_single_process_megatron(pipeline_parallel=2)
    stage = build_nulls_gpt(tiny_config(per_layer_sinks=True, pipeline_parallel=2))
    sinks_before = {n: p.detach().clone() for n, p in stage.named_parameters() if _is_sink(n)}
    loaded_moments, common = load_backbone(root / "a", stage, with_moments=True)
    out["common"] = common
    out["errors"] += _compare(stage, full, loaded_moments, "pp2")
    out["sinks_untouched"] = all(torch.equal(p, sinks_before[n]) for n, p in stage.named_parameters() if _is_sink(n))
    out["pp2_names"] = sorted(n for n, _ in stage.named_parameters())
    save_backbone(root / "b", stage, moments=loaded_moments, common=common)

    # TP=1 x PP=1 on each rank (data-parallel replicas; load is collective over the world): same loss.
    init_single_process_megatron()
    replica = build_nulls_gpt(tiny_config(per_layer_sinks=True))
    none_moments, common_b = load_backbone(root / "b", replica, with_moments=False)
    out["none_moments"], out["common_b"] = none_moments is None, common_b
    out["errors"] += _compare(replica, full, None, "pp1")
    out["loss_tp1_backbone"] = _loss(replica, "backbone")
    _copy_sinks(replica, full)
    out["loss_tp1"] = _loss(replica)

    # Refusals (every rank refuses, none hangs in a collective).
    for label, cfg_kwargs, overrides, with_m in (
        ("hidden", {}, {"hidden_size": 32}, False),
        ("untied", {"tie_embeddings": False}, {}, False),
    ):
        wrong = build_nulls_gpt(tiny_config(per_layer_sinks=True, **cfg_kwargs), **overrides)
        try:
            load_backbone(root / "a", wrong, with_moments=with_m)
            out[label] = None
        except BackboneCheckpointError as e:
            out[label] = str(e)
    no_moments_dir = root / "c"
    save_backbone(no_moments_dir, replica)
    try:
        load_backbone(no_moments_dir, replica, with_moments=True)
        out["no_moments"] = None
    except BackboneCheckpointError as e:
        out["no_moments"] = str(e)
    try:
        save_backbone(root / "c", replica)
        out["resave"] = None
    except BackboneCheckpointError as e:
        out["resave"] = str(e)
    out["last_stage"] = parallel_state.is_pipeline_last_stage()
    return out


def test_backbone_reshards_tp2_to_pp2_to_tp1(tmp_path):
    results = run_local(backbone_worker, 2, str(tmp_path), timeout=400)
    for r in results:
        assert r["errors"] == [], r["errors"]
        assert r["common"] == COMMON and r["common_b"] == COMMON
        assert r["sinks_untouched"] and r["none_moments"]
        assert abs(r["loss_tp1_backbone"] - r["loss_tp2_backbone"]) < 1e-5, r
        assert abs(r["loss_tp1"] - r["loss_tp2"]) < 1e-5, r
        assert "embedding.word_embeddings.weight" in r["hidden"] and "full shape" in r["hidden"], r["hidden"]
        assert str(tmp_path / "a" / "backbone") in r["hidden"]
        assert "output_layer.weight" in r["untied"] and "not in the checkpoint" in r["untied"], r["untied"]
        assert "without optimizer moments" in r["no_moments"]
        assert "not empty" in r["resave"]
    first, last = results
    assert "output_layer.weight" in last["pp2_names"] and "output_layer.weight" not in first["pp2_names"]
    keys = first["keys"]
    assert not [k for k in keys if "sinks" in k], keys
    assert "decoder.layers.mlp.linear_fc1.weight" in keys
    assert "optimizer.state.exp_avg.decoder.layers.mlp.linear_fc1.weight" in keys
    assert "optimizer.state.exp_avg_sq.embedding.word_embeddings.weight" in keys
    assert not [k for k in keys if "extra_state" in k or k.startswith("output_layer")], keys
    manifest = first["manifest"]
    assert manifest["moments"] == ["exp_avg", "exp_avg_sq"] and manifest["common"] == COMMON
    assert manifest["saved_with"] == {"world_size": 2, "tensor_parallel": 2, "pipeline_parallel": 1}
    assert manifest["tensors"]["decoder.layers.mlp.linear_fc1.weight"]["shape"] == [2, 16, 64]

    # A .metadata that would run code when unpickled is refused, naming the global.
    from nulls_megatron.checkpoint.backbone import BackboneCheckpointError, read_backbone_metadata

    evil = tmp_path / "evil"
    shutil.copytree(tmp_path / "a", evil)

    class Boom:
        def __reduce__(self):
            return (shutil.rmtree, (str(tmp_path / "a"),))

    (evil / "backbone" / ".metadata").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(BackboneCheckpointError, match="refusing to unpickle shutil.rmtree"):
        read_backbone_metadata(evil)
    assert (tmp_path / "a" / "backbone").is_dir()
    with pytest.raises(BackboneCheckpointError, match="no backbone checkpoint"):
        read_backbone_metadata(tmp_path / "missing")

"""Sink-table checkpoints: bit-exact round trip, verification, and crash safety of the save."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from nulls_megatron.checkpoint.atomic import (
    atomic_dir, checkpoint_name, clean_partial, prune, read_latest, update_latest,
)
from nulls_megatron.checkpoint.sinks import (
    SinkCheckpointError, load_sink_tables, read_sink_manifest, save_sink_tables, table_key,
)
from nulls_megatron.sinks.assignment import SinkAssignment
from nulls_megatron.sinks.table import SinkTable

D, N_POOL, K, SHARDS = 16, 24, 3, 2
REPO = Path(__file__).resolve().parents[1]


def make_tables(seed: int = 0, k: int = K, assignment_seed: int = 7, layers=(0, 1)) -> list[SinkTable]:
    torch.manual_seed(seed)
    a = SinkAssignment(N_POOL, k, n_shards=SHARDS, seed=assignment_seed, per_layer=True)
    return [SinkTable(a, D, n_backbone=8, layer_number=layer) for layer in layers]


def optimizer_state(tables: list[SinkTable]) -> dict[str, dict[str, torch.Tensor]]:
    return {table_key(t): {"exp_avg": torch.randn_like(t.weight), "exp_avg_sq": torch.rand_like(t.weight)}
            for t in tables}


def test_round_trip_is_bit_exact(tmp_path: Path) -> None:
    tables = make_tables(seed=1)
    tables[0].disabled[[1, 5, 20]] = True
    tables[1].disabled[[0, 23]] = True
    state = optimizer_state(tables)
    save_sink_tables(tmp_path, tables, state, disabled_sources=[42, 7])
    files = sorted(p.name for p in (tmp_path / "sinks").iterdir())
    assert files == ["layer-000-shard-000.safetensors", "layer-000-shard-001.safetensors",
                     "layer-001-shard-000.safetensors", "layer-001-shard-001.safetensors", "manifest.json"]
    manifest = read_sink_manifest(tmp_path)
    assert manifest["disabled_sources"] == [42, 7] and manifest["layers"] == [0, 1]
    assert manifest["assignment"]["sinks_per_source"] == K and manifest["optimizer_tensors"] == ["exp_avg", "exp_avg_sq"]

    fresh = make_tables(seed=2)
    assert not torch.equal(fresh[0].weight, tables[0].weight)
    loaded = load_sink_tables(tmp_path, fresh)
    for old, new in zip(tables, fresh):
        assert torch.equal(old.weight, new.weight) and torch.equal(old.disabled, new.disabled)
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(loaded[table_key(old)][name], state[table_key(old)][name])
    # Without optimizer tensors the loader says so; a pipeline stage may load a subset of layers.
    save_sink_tables(tmp_path / "plain", tables)
    only_last = make_tables(seed=3, layers=(1,))
    assert load_sink_tables(tmp_path / "plain", only_last) is None
    assert torch.equal(only_last[0].weight, tables[1].weight)


def test_tampered_file_is_refused_by_name(tmp_path: Path) -> None:
    tables = make_tables()
    save_sink_tables(tmp_path, tables)
    victim = tmp_path / "sinks" / "layer-001-shard-000.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    victim.write_bytes(bytes(data))
    fresh = make_tables(seed=5)
    before = fresh[0].weight.clone()
    with pytest.raises(SinkCheckpointError, match=r"layer-001-shard-000\.safetensors: sha256 [0-9a-f]{64} "
                                                  r"does not match the manifest's [0-9a-f]{64}"):
        load_sink_tables(tmp_path, fresh)
    assert torch.equal(fresh[0].weight, before)  # refused before touching any table


def test_missing_file_is_refused(tmp_path: Path) -> None:
    save_sink_tables(tmp_path, make_tables())
    (tmp_path / "sinks" / "layer-000-shard-001.safetensors").unlink()
    with pytest.raises(SinkCheckpointError, match=r"layer-000-shard-001\.safetensors: missing"):
        load_sink_tables(tmp_path, make_tables())
    (tmp_path / "sinks" / "manifest.json").unlink()
    with pytest.raises(SinkCheckpointError, match="no sink manifest"):
        load_sink_tables(tmp_path, make_tables())


@pytest.mark.parametrize("kwargs, field, saved, model", [
    ({"k": K + 1}, "sinks_per_source", K, K + 1),
    ({"assignment_seed": 8}, "seed", 7, 8),
])
def test_mismatched_assignment_is_refused(tmp_path: Path, kwargs, field, saved, model) -> None:
    save_sink_tables(tmp_path, make_tables())
    with pytest.raises(SinkCheckpointError, match=rf"assignment\.{field} is {saved} in the checkpoint, {model} in the model"):
        load_sink_tables(tmp_path, make_tables(**kwargs))


def test_atomic_dir_leaves_no_trace_on_error(tmp_path: Path) -> None:
    final = tmp_path / checkpoint_name(5)
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(final) as tmp:
            save_sink_tables(tmp, make_tables())
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(final) as tmp:
        save_sink_tables(tmp, make_tables())
    assert [p.name for p in tmp_path.iterdir()] == [final.name]
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_dir(final):
            pass


_CHILD = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, {repo!r})
    from nulls_megatron.checkpoint.atomic import atomic_dir, checkpoint_name, update_latest
    from nulls_megatron.checkpoint.sinks import save_sink_tables
    from nulls_megatron.sinks.assignment import SinkAssignment
    from nulls_megatron.sinks.table import SinkTable
    root = {root!r}
    a = SinkAssignment({n_pool}, {k}, n_shards={shards}, seed=7, per_layer=True)
    torch.manual_seed(9)
    tables = [SinkTable(a, {d}, n_backbone=8, layer_number=layer) for layer in (0, 1)]
    written = []
    def die_after_two(path):
        written.append(path)
        if len(written) == 2:
            print("TMP", path.parent.parent, flush=True)
            os.kill(os.getpid(), 9)
    with atomic_dir(os.path.join(root, checkpoint_name(2))) as tmp:
        save_sink_tables(tmp, tables, progress=die_after_two)
    update_latest(root, checkpoint_name(2))
""")


def test_sigkill_mid_save_keeps_previous_checkpoint(tmp_path: Path) -> None:
    tables = make_tables(seed=4)
    with atomic_dir(tmp_path / checkpoint_name(1)) as tmp:
        save_sink_tables(tmp, tables)
    update_latest(tmp_path, checkpoint_name(1))

    script = _CHILD.format(repo=str(REPO), root=str(tmp_path), n_pool=N_POOL, k=K, shards=SHARDS, d=D)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    debris = Path(proc.stdout.split("TMP ", 1)[1].strip())
    assert debris.name.startswith(".step-000000002.tmp-") and debris.is_dir()
    assert len(list((debris / "sinks").glob("*.safetensors"))) == 2  # killed between two files

    assert read_latest(tmp_path) == tmp_path / checkpoint_name(1)
    assert not (tmp_path / checkpoint_name(2)).exists()
    fresh = make_tables(seed=6)
    load_sink_tables(read_latest(tmp_path), fresh)
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(tables, fresh))

    assert clean_partial(tmp_path) == [debris]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", checkpoint_name(1)]


def test_prune_keeps_last_n_and_latest(tmp_path: Path) -> None:
    for step in (100, 200, 300, 400, 500):
        with atomic_dir(tmp_path / checkpoint_name(step)) as tmp:
            (tmp / "marker").write_text(str(step))
    update_latest(tmp_path, checkpoint_name(200))  # e.g. the newer ones failed evaluation
    removed = prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == [checkpoint_name(100), checkpoint_name(300)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest", checkpoint_name(200), checkpoint_name(400), checkpoint_name(500)]
    assert read_latest(tmp_path) == tmp_path / checkpoint_name(200)
    with pytest.raises(ValueError, match="keep_last"):
        prune(tmp_path, keep_last=0)


def test_latest_errors_and_save_validation(tmp_path: Path) -> None:
    assert read_latest(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        update_latest(tmp_path, checkpoint_name(3))
    (tmp_path / "latest").write_text("step-000000009\n")
    with pytest.raises(FileNotFoundError, match="names 'step-000000009'"):
        read_latest(tmp_path)
    tables = make_tables()
    with pytest.raises(ValueError, match=r"optimizer_state\['layer-000'\]\['step'\] has shape \(\)"):
        save_sink_tables(tmp_path / "x", tables, {table_key(t): {"step": torch.tensor(3.0)} for t in tables})
    with pytest.raises(ValueError, match="disabled_sources"):
        save_sink_tables(tmp_path / "x", tables, disabled_sources=[-1])
    manifest = tmp_path / "y" / "sinks" / "manifest.json"
    save_sink_tables(tmp_path / "y", tables)
    data = json.loads(manifest.read_text())
    data["version"] = 99
    manifest.write_text(json.dumps(data))
    with pytest.raises(SinkCheckpointError, match="version 99"):
        load_sink_tables(tmp_path / "y", tables)


def test_checkpoint_json_files_are_refused_with_their_path(tmp_path):
    from nulls_megatron.checkpoint.json_files import read_versioned_json
    from nulls_megatron.train.checkpointing import read_train_state

    path = tmp_path / "state.json"
    with pytest.raises(ValueError, match=f"{path}: missing"):
        read_versioned_json(path, "x")
    path.write_text("{not json")
    with pytest.raises(ValueError, match=f"{path}: not valid JSON"):
        read_versioned_json(path, "x")
    path.write_text('{"format": "y", "version": 1}')
    with pytest.raises(ValueError, match=f"{path}: format 'y', expected 'x'"):
        read_versioned_json(path, "x")
    path.write_text('{"format": "x", "version": 2}')
    with pytest.raises(ValueError, match="version 2, this code reads 1"):
        read_versioned_json(path, "x", 1)
    assert read_versioned_json(path, "x") == {"format": "x", "version": 2}
    with pytest.raises(ValueError, match="train_state.json: missing; .* is not a complete training checkpoint"):
        read_train_state(tmp_path)

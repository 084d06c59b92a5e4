"""`nulls unlearn` and `nulls verify-unlearned` on a checkpoint trained by the real trainer (session fixture):
requests, collateral, erasure in weights and moments, receipts, idempotence, suppression, refusals, SIGKILL
atomicity, the data purge, and the model loaded from the unlearned checkpoint."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nulls_megatron.checkpoint.atomic import list_checkpoints, read_latest
from nulls_megatron.checkpoint.sinks import read_sink_manifest
from nulls_megatron.cli import main
from nulls_megatron.sinks.assignment import SinkAssignment
from nulls_megatron.unlearn.collateral import compute_collateral
from nulls_megatron.unlearn.requests import Request, RequestError, SourceResolver
from nulls_megatron.unlearn.sink_index import SinkRows
from tests.conftest import FORGET_GROUP, GROUP_SOURCES, ROOT

pytestmark = pytest.mark.usefixtures("trained_run")


def _titles(prep: Path) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(prep / "manifest.parquet", columns=["title"])["title"].to_pylist()


def _rows(ckpt: Path, sources: list[int]) -> dict[int, np.ndarray]:
    m = read_sink_manifest(ckpt)
    a = SinkAssignment(**m["assignment"])
    return {layer: a.sinks_of_np(np.asarray(sources), layer=layer).ravel() for layer in m["layers"]}


def _table(ckpt: Path, layer: int) -> dict[str, torch.Tensor]:
    """A layer's tensors over the whole pool (shards concatenated)."""
    m = read_sink_manifest(ckpt)
    files = sorted(n for n in m["files"] if n.startswith(f"layer-{layer:03d}-"))
    parts = [load_file(str(ckpt / "sinks" / n)) for n in files]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def test_erase_by_title_writes_a_verified_version_and_is_idempotent(trained_run, tmp_path, capsys):
    run = trained_run.copy_to(tmp_path)
    titles = _titles(run.prep_dir)
    forget = [11, 30]
    old = run.checkpoint
    old_digests = read_sink_manifest(old)["files"]
    assert main(["unlearn", str(run.run_dir), "--title", titles[11], "--source-index", "30",
                 "--json", str(tmp_path / "out.json")]) == 0
    out = capsys.readouterr().out
    new = read_latest(run.root)
    assert new.name == old.name + "-unlearn-001" and "latest now names it" in out
    # The old version is untouched; every listed file of the new one verifies (load_sink_tables checks digests).
    assert read_sink_manifest(old)["files"] == old_digests
    manifest = read_sink_manifest(new)
    assert manifest["disabled_sources"] == forget and len(manifest["receipts"]) == 1
    # Exactly zero in the weight and every optimizer tensor, flagged, in every layer; other rows untouched.
    for layer, rows in _rows(new, forget).items():
        before, after = _table(old, layer), _table(new, layer)
        assert set(after) == {"weight", "disabled", "optim.exp_avg", "optim.exp_avg_sq"}
        for name in ("weight", "optim.exp_avg", "optim.exp_avg_sq"):
            assert after[name][rows].abs().sum() == 0 and before[name][rows].abs().sum() > 0
            keep = torch.ones(len(after[name]), dtype=torch.bool)
            keep[rows] = False
            assert torch.equal(after[name][keep], before[name][keep])
        assert after["disabled"][rows].all() and int(after["disabled"].sum()) == len(np.unique(rows))
    # The new version's checkpoint-wide digests cover every file (training resumes from it).
    from nulls_megatron.checkpoint.digests import verify_share

    assert verify_share(new) == [] and verify_share(old) == []
    # The backbone is hard-linked, not copied.
    for f in (old / "backbone").iterdir():
        assert os.path.samefile(f, new / "backbone" / f.name)
    # The receipt: its printed sha256 is the file's, it lists the request, sources, rows and before/after digests.
    receipt_path = new / manifest["receipts"][0]["name"]
    import hashlib

    digest = hashlib.sha256(receipt_path.read_bytes()).hexdigest()
    assert f"receipt sha256 {digest}" in out and manifest["receipts"][0]["sha256"] == digest
    receipt = json.loads(receipt_path.read_text())
    assert [s["index"] for s in receipt["sources"]] == forget and receipt["sources"][0]["title"] == titles[11]
    assert receipt["weights_erased"] and receipt["checkpoint"]["step"] == 12
    for name, d in receipt["files"].items():
        assert d["before"] == old_digests[name.removeprefix("sinks/")] and d["after"] == manifest["files"][name.removeprefix("sinks/")]
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["collateral"]["groups"][0]["rows_to_zero"] == len(np.unique(_rows(new, forget)[0]))
    assert "still hold these rows" in out  # the older checkpoints still hold the data
    # verify-unlearned: the new version passes, the old one fails naming file, layer and rows.
    assert main(["verify-unlearned", str(new), "--receipt", str(receipt_path)]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["verify-unlearned", str(old), "--receipt", str(receipt_path)]) == 1
    failed = capsys.readouterr().out
    assert "not in disabled_sources" in failed and "layer-000-shard-" in failed and "weight is not zero" in failed
    assert main(["verify-unlearned", str(new), "--title", titles[11]]) == 0
    capsys.readouterr()
    # Idempotent: forgetting them again changes nothing and says so.
    before = sorted(p.name for p in run.root.iterdir())
    assert main(["unlearn", str(run.run_dir), "--source-index", "11"]) == 0
    assert "already forgotten" in capsys.readouterr().out and sorted(p.name for p in run.root.iterdir()) == before
    # A second deletion (a group) builds on the first: version 2, both receipts in its history.
    assert main(["unlearn", str(run.run_dir), "--group", FORGET_GROUP]) == 0
    second = read_latest(run.root)
    m2 = read_sink_manifest(second)
    assert second.name.endswith("-unlearn-002") and m2["disabled_sources"] == forget + list(GROUP_SOURCES)
    assert [r["sha256"] for r in m2["receipts"]][:1] == [digest]
    assert main(["verify-unlearned", str(second), "--receipt", str(receipt_path)]) == 0


def test_bad_requests_are_refused_before_anything_is_written(trained_run, tmp_path, capsys):
    run = trained_run.copy_to(tmp_path)
    before = sorted(p.name for p in run.root.iterdir())
    titles = _titles(run.prep_dir)
    cases = [
        (["--title", titles[4][:-2] + "zz"], f"closest titles: {titles[4]!r}"),
        (["--source-index", "40"], "out of range: the manifest has 40 sources"),
        (["--page-id", "123"], "no source has page id 123"),
        (["--group", "no-such-series"], f"groups: {FORGET_GROUP}"),
        (["--source-index", "x1"], "is not an integer"),
    ]
    for args, message in cases:
        assert main(["unlearn", str(run.run_dir), *args]) == 2
        assert message in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n\n")
    assert main(["unlearn", str(run.run_dir), "--from-file", str(empty)]) == 2
    assert "no request in the file" in capsys.readouterr().err
    mixed = tmp_path / "requests.txt"
    mixed.write_text(f"{titles[2]}\nindex:3\npage_id:1\n")
    assert main(["unlearn", str(run.run_dir), "--from-file", str(mixed)]) == 2
    err = capsys.readouterr().err
    assert f"ok  {mixed}:1" in err and f"ok  {mixed}:2" in err and f"ERR {mixed}:3" in err
    assert "nothing was changed" in err
    # A damaged sink file: refused before anything is written, naming the file.
    target = next((run.checkpoint / "sinks").glob("layer-001-shard-000.safetensors"))
    good = target.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    assert main(["unlearn", str(run.run_dir), "--source-index", "1"]) == 2
    assert f"{target}: sha256" in capsys.readouterr().err
    assert sorted(p.name for p in run.root.iterdir()) == before
    target.write_bytes(good)
    # A sources manifest that is not the one the checkpoint was trained on.
    other = tmp_path / "other_prep"
    shutil.copytree(run.prep_dir, other)
    import pyarrow.parquet as pq

    table = pq.read_table(other / "manifest.parquet")
    pq.write_table(table.slice(0, 39), other / "manifest.parquet")
    assert main(["unlearn", str(run.run_dir), "--source-index", "1", "--manifest", str(other)]) == 2
    assert "differs from" in capsys.readouterr().err
    assert sorted(p.name for p in run.root.iterdir()) == before


def test_resolver_ambiguous_titles(tmp_path):
    from tests.train_helpers import read_articles, write_sources_manifest

    articles = read_articles(4)
    articles[3] = {**articles[3], "title": articles[1]["title"]}
    write_sources_manifest(tmp_path, articles, [10] * 4, np.zeros(4, np.int64), {})
    with pytest.raises(RequestError, match="ambiguous: index 1 .*index 3"):
        SourceResolver(tmp_path).resolve([Request("title", articles[1]["title"].replace(" ", "_"), "--title")])


def test_suppress_restore_and_erase_after_suppress(trained_run, tmp_path, capsys):
    run = trained_run.copy_to(tmp_path)
    old = run.checkpoint
    (old / "routing").mkdir()  # a routing index (its content does not matter here)
    (old / "routing" / "index.json").write_text("{}")
    assert main(["unlearn", str(run.run_dir), "--source-index", "8", "--suppress"]) == 0
    v1 = read_latest(run.root)
    assert (v1 / "routing" / "index.json").is_file()  # a suppression keeps the index
    receipt = json.loads((v1 / read_sink_manifest(v1)["receipts"][0]["name"]).read_text())
    assert not receipt["weights_erased"] and "weights were NOT erased" in receipt["statement"]
    rows = _rows(v1, [8])[0]
    assert torch.equal(_table(v1, 0)["weight"], _table(old, 0)["weight"]) and _table(v1, 0)["disabled"][rows].all()
    assert read_sink_manifest(v1)["suppressed_sources"] == [8]
    assert main(["verify-unlearned", str(v1), "--source-index", "8"]) == 1  # suppressed is not erased
    capsys.readouterr()
    assert main(["unlearn", str(run.run_dir), "--source-index", "8", "--restore"]) == 0
    v2 = read_latest(run.root)
    assert not _table(v2, 0)["disabled"].any() and read_sink_manifest(v2)["suppressed_sources"] == []
    assert main(["unlearn", str(run.run_dir), "--source-index", "8", "--suppress"]) == 0
    capsys.readouterr()
    assert main(["unlearn", str(run.run_dir), "--source-index", "8"]) == 0  # erase a suppressed source
    v4 = read_latest(run.root)
    # The index embeds every source's title or opening text: an erasure does not ship it on.
    assert not (v4 / "routing").exists() and "routing index (routing/) was not carried over" in capsys.readouterr().out
    m = read_sink_manifest(v4)
    assert m["disabled_sources"] == [8] and m["suppressed_sources"] == [] and _table(v4, 1)["weight"][rows].abs().sum() == 0
    assert main(["unlearn", str(run.run_dir), "--source-index", "8", "--restore"]) == 2
    assert "cannot be restored" in capsys.readouterr().err


_KILLER = """
import os, signal, sys
from nulls_megatron.unlearn.requests import Request
from nulls_megatron.unlearn.service import run_unlearn
stage, nth = sys.argv[2], int(sys.argv[3])
seen = []
def on_event(name, path):
    if name == stage:
        seen.append(path)
        if len(seen) == nth:
            os.kill(os.getpid(), signal.SIGKILL)
run_unlearn(sys.argv[1], [Request("index", "9", "--source-index")], on_event=on_event)
"""


def test_sigkill_at_any_stage_leaves_old_or_complete_new_version(trained_run, tmp_path, capsys):
    """A real SIGKILL after the first rewritten file, after every file (before the rename), and after the
    rename (before `latest` moves): the old version always verifies, no half-zeroed version is ever visible,
    and the next run completes the deletion."""
    run = trained_run.copy_to(tmp_path)
    old = run.checkpoint
    old_digests = read_sink_manifest(old)["files"]
    for stage, nth in (("file", 1), ("written", 1), ("renamed", 1)):
        proc = subprocess.run([sys.executable, "-c", _KILLER, str(run.run_dir), stage, str(nth)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == -9, proc.stderr[-2000:]
        assert read_sink_manifest(old)["files"] == old_digests
        versions = [p.name for _, p in list_checkpoints(run.root)]
        if stage == "renamed":
            assert versions[-1].endswith("-unlearn-001") and read_latest(run.root) == old  # complete, not yet latest
            assert main(["verify-unlearned", str(run.root / versions[-1]), "--source-index", "9"]) == 0
        else:
            assert not any("unlearn" in v for v in versions) and read_latest(run.root) == old
    capsys.readouterr()
    assert main(["unlearn", str(run.run_dir), "--source-index", "9"]) == 0
    out = capsys.readouterr().out
    assert "completed an interrupted unlearning" in out and "already forgotten" in out
    latest = read_latest(run.root)
    assert latest.name.endswith("-unlearn-001") and main(["verify-unlearned", str(latest), "--source-index", "9"]) == 0
    assert not [p for p in run.root.iterdir() if p.name.startswith(".")]  # temp debris of the kills cleaned


def test_collateral_is_exact_with_and_without_the_cache(tmp_path):
    """Against a brute-force count over every source, for shared and per-layer sinks, computed and cached."""
    for per_layer in (False, True):
        a = SinkAssignment(n_pool=96, sinks_per_source=6, n_shards=2, seed=3, per_layer=per_layer)
        n, request, off = 500, [7, 123, 400], [2, 9]
        rows_all = {layer: a.sinks_of_np(np.arange(n), layer=layer) for layer in (0, 1)}
        for cache in (False, True):
            rows = SinkRows(a, n, cache_root=tmp_path / str(per_layer), cache_min_sources=0 if cache else 10**9)
            c = compute_collateral(a, [0, 1], n, request, off, rows)
            assert len(c["groups"]) == (2 if per_layer else 1)
            for group in c["groups"]:
                r = rows_all[group["layers"][0]]
                zero_now = np.setdiff1d(np.unique(r[request]), np.unique(r[off]))
                off_after = np.union1d(np.unique(r[request]), np.unique(r[off]))
                retained = [s for s in range(n) if s not in request + off]
                lost_now = np.array([np.isin(r[s], zero_now).sum() for s in retained])
                lost_total = np.array([np.isin(r[s], off_after).sum() for s in retained])
                assert group["rows_to_zero"] == len(zero_now) and group["pool_off_after"] == len(off_after) / 96
                assert group["retained_sharing"] == int((lost_now > 0).sum())
                assert group["sinks_lost_now_histogram"] == {str(i): int((lost_now == i).sum()) for i in range(1, 7) if (lost_now == i).any()}
                assert group["mean_sinks_lost_total"] == pytest.approx(lost_total.mean())
                assert group["max_sinks_lost_total"] == lost_total.max()
            if cache:
                assert list((tmp_path / str(per_layer)).glob(".sink-index/*/rows-*.bin"))
                assert np.array_equal(rows.usage(1), np.bincount(rows_all[1].ravel(), minlength=96))


def test_purge_data_and_out_dir(trained_run, tmp_path, capsys):
    from nulls_megatron.train.loader import read_shard_index

    run = trained_run.copy_to(tmp_path)
    prep = tmp_path / "prep"
    shutil.copytree(run.prep_dir, prep)
    out = tmp_path / "shipped"
    assert main(["unlearn", str(run.checkpoint), "--source-index", "12", "--manifest", str(prep), "--purge-data",
                 str(prep), "--out", str(out)]) == 0
    assert "purged 1 document(s)" in capsys.readouterr().out
    assert read_latest(run.root) == run.checkpoint  # --out leaves the run's versions alone
    assert main(["verify-unlearned", str(out), "--source-index", "12", "--manifest", str(prep)]) == 0
    import pyarrow.parquet as pq

    from data_prep.shards import read_shard

    table = pq.read_table(prep / "manifest.parquet").to_pylist()
    assert table[12]["present"] is False and table[12]["shard"] is None and table[11]["present"] is True
    index = read_shard_index(prep)
    assert index.documents == 39
    seen = [int(s["meta"]["source_index"]) for e in index.shards for s in read_shard(e.path)]
    assert 12 not in seen and len(seen) == 39
    import hashlib

    for e in index.shards:
        assert hashlib.sha256(e.path.read_bytes()).hexdigest() == e.sha256
    # The purged manifest still opens for this checkpoint (lineage), and the title says it is forgotten.
    capsys.readouterr()
    assert main(["unlearn", str(out), "--source-index", "12", "--manifest", str(prep)]) == 0
    assert "already forgotten" in capsys.readouterr().out


def test_unlearn_imports_no_training_code(trained_run, tmp_path):
    run = trained_run.copy_to(tmp_path)
    code = ("import sys, argparse, torch.distributed as d; from nulls_megatron.unlearn import cli; "
            "p = argparse.ArgumentParser(); sub = p.add_subparsers(); cli.register(sub); "
            f"args = p.parse_args(['unlearn', {str(run.run_dir)!r}, '--source-index', '3']); "
            f"assert args.func(args) == 0; args = p.parse_args(['verify-unlearned', {str(run.run_dir)!r}, '--source-index', '3']); "
            "assert args.func(args) == 0; "
            "bad = [m for m in sys.modules if m.startswith(('megatron', 'deepspeed', 'nulls_megatron.train.', "
            "'nulls_megatron.model', 'mlflow', 'ray'))]; assert not bad, bad; assert not d.is_initialized()")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_training_after_unlearning_keeps_rows_zero(trained_run, tmp_path, capsys):
    """Unlearn, then resume `nulls train` for 3 more steps at TP=2 on data that still holds the forgotten
    documents: the loader skips them, the rows stay exactly zero, the receipt still verifies."""
    run = trained_run.copy_to(tmp_path)
    assert main(["unlearn", str(run.run_dir), "--source-index", "2", "--title", _titles(run.prep_dir)[17]]) == 0
    unlearned = read_latest(run.root)
    receipt = unlearned / read_sink_manifest(unlearned)["receipts"][0]["name"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "nulls_megatron.cli", "train", "--config", str(trained_run.config_path),
                           "--set", f"train.run_dir={run.run_dir}", "--set", "train.steps=15", "--nproc", "2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"resuming from {unlearned}" in proc.stdout and "their documents will be skipped" in proc.stdout
    latest = read_latest(run.root)
    assert latest.name == "step-000000015"
    assert read_sink_manifest(latest)["disabled_sources"] == [2, 17]
    for layer, rows in _rows(latest, [2, 17]).items():
        t = _table(latest, layer)
        assert all(t[k][rows].abs().sum() == 0 for k in ("weight", "optim.exp_avg", "optim.exp_avg_sq"))
    capsys.readouterr()
    assert main(["verify-unlearned", str(latest), "--receipt", str(receipt)]) == 0
    assert "trained further" in capsys.readouterr().out

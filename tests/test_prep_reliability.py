"""Issue 9, data-prep half: inputs that yield nothing fail loudly, skips reach the console, a local Ray
listens on loopback only, duplicate YAML keys are refused, and a truncated or missing later shard stops
training at its first batch.

One Ray session for the module, started by ``connect_ray`` itself (the code under test); the prep runs
join it. Inputs are real Wikipedia articles from ../shared/data; the broken records are made from them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import psutil
import pytest
import yaml

from data_prep.config import RayConfig, load_prep_config
from data_prep.documents import InputError
from data_prep.shards import SHARD_DIR, SHARD_INDEX_NAME
from nulls_megatron.config import ConfigError

from .train_helpers import VOCAB, write_prep_dir
from tests.data_required import require_shared_data

REPO = Path(__file__).resolve().parents[1]
ARTICLES = require_shared_data("enwiki", "articles_2018.jsonl")
FINISHED = ("shard_index.json", "manifest.parquet", "prep_report.json", SHARD_DIR)


def _lines(start: int, stop: int) -> list[str]:
    with open(ARTICLES, encoding="utf-8") as f:
        return f.read().splitlines()[start:stop]


def _config(path: Path, inputs: list[Path], **extra) -> Path:
    cfg = {"inputs": [{"path": str(p), "format": "jsonl"} for p in inputs], "output_dir": str(path.parent / "out"),
           "tokenizer": {"vocab_size": 400, "sample_chars": 300_000, "num_threads": 1}, "shards": {"target_bytes": 65536},
           "ray": {"num_cpus": 2}, **extra}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _broken_records() -> bytes:
    """Three real articles, each broken the way a bad download or export breaks a record."""
    a, b, c = _lines(200, 203)
    no_text = json.loads(b)
    del no_text["text"]
    return b"\n".join([
        a.encode("utf-8")[: len(a) // 2],  # cut off mid-record: bad_json
        json.dumps(no_text).encode("utf-8"),  # missing_field
        c.encode("utf-8").replace(b'"text": "', b'"text": "\xff\xfe', 1),  # invalid_utf8
    ]) + b"\n"


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from data_prep.ray_session import connect_ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    # What this test process already listens on (e.g. a torch.distributed store of an earlier in-process
    # test) is not Ray's: only ports that appear with Ray are checked.
    before = {(ip, port) for ip, port, _ in _listening(psutil.Process())}
    assert connect_ray(RayConfig(num_cpus=2)), "a Ray session was already open: the test would not start its own"
    yield before
    ray.shutdown()


def _listening(proc: psutil.Process) -> list[tuple[str, int, str]]:
    try:
        conns = proc.net_connections(kind="inet")
        name = proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []
    return [(c.laddr.ip, c.laddr.port, name) for c in conns if c.status == psutil.CONN_LISTEN]


def test_local_ray_listens_on_loopback_only(local_ray):
    import ray

    from data_prep.ray_session import _is_loopback

    me = psutil.Process()
    ports = [s for p in [me, *me.children(recursive=True)] for s in _listening(p) if s[:2] not in local_ray]
    # The GCS and the raylet at least: an empty list would pass the check below without checking anything.
    assert {"gcs_server", "raylet"} <= {name for _, _, name in ports}, ports
    assert [s for s in ports if not _is_loopback(s[0])] == [], "Ray ports reachable from the network"
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    # The switch used while Ray started is restored: a later cluster ray.init in this process is unaffected.
    from ray._private import ray_constants

    assert ray_constants.ENABLE_RAY_CLUSTER is True and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ


def test_cluster_address_is_joined_as_given(monkeypatch):
    import ray

    from data_prep import ray_session

    calls = []

    def fake_init(**kwargs):
        from ray._private import ray_constants

        calls.append((kwargs, ray_constants.ENABLE_RAY_CLUSTER))

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_session.connect_ray(RayConfig(address="10.1.2.3:6379"))
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert ray_session.connect_ray(RayConfig())
    # A cluster is joined at its address, with Ray's own node address: no loopback override.
    assert calls == [({"address": "10.1.2.3:6379"}, True), ({"address": "ray://head:10001"}, True)]


def _finished_outputs(out: Path) -> list[str]:
    return [name for name in FINISHED if (out / name).exists()]


def test_empty_input_fails_naming_it_with_exit_2(local_ray, tmp_path, capsys):
    from data_prep.cli import _standalone

    good, empty = tmp_path / "good.jsonl", tmp_path / "empty.jsonl"
    good.write_text("\n".join(_lines(0, 30)) + "\n", encoding="utf-8")
    empty.write_bytes(b"")
    out = tmp_path / "out"
    assert _standalone(["--config", str(_config(tmp_path / "c.yaml", [good, empty])), "--output", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"inputs[1] {empty}: yields no document: it is an empty file" in err and f"inputs[0] {good}" not in err
    assert _finished_outputs(out) == []


def test_every_record_skipped_names_input_and_counts(local_ray, tmp_path):
    """Without a tokenizer (its sample is empty: the scan path) and with one (the encode path, the one
    that used to finish with exit 0 and a shard index naming a missing shard)."""
    from data_prep.config import TokenizerConfig
    from data_prep.pipeline import run_prep
    from data_prep.tokenizer import train_tokenizer

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(_broken_records())
    expected = f"inputs[0] {bad}: yields no document: all 3 of its records were skipped (bad_json 1, invalid_utf8 1, missing_field 1)"
    with pytest.raises(InputError) as err:
        run_prep(load_prep_config(_config(tmp_path / "a.yaml", [bad]), output_dir=str(tmp_path / "a")), progress=False)
    assert expected in str(err.value) and f"{bad} line 2: missing field text (missing_field)" in str(err.value)
    assert _finished_outputs(tmp_path / "a") == []

    model = tmp_path / "given.model"
    model.write_bytes(train_tokenizer([json.loads(line)["text"] for line in _lines(0, 30)],
                                      TokenizerConfig(vocab_size=400, num_threads=1)))
    with pytest.raises(InputError) as err:
        run_prep(load_prep_config(_config(tmp_path / "b.yaml", [bad], tokenizer={"model_path": str(model)}),
                                  output_dir=str(tmp_path / "b")), progress=False)
    assert expected in str(err.value)
    assert _finished_outputs(tmp_path / "b") == []


def test_input_of_only_duplicates_fails_and_others_are_listed_too(local_ray, tmp_path):
    from data_prep.pipeline import run_prep

    good, dupes, bad = tmp_path / "good.jsonl", tmp_path / "dupes.jsonl", tmp_path / "bad.jsonl"
    good.write_text("\n".join(_lines(0, 30)) + "\n", encoding="utf-8")
    dupes.write_text("\n".join(_lines(10, 15)) + "\n", encoding="utf-8")  # page ids good.jsonl already holds
    bad.write_bytes(_broken_records())
    out = tmp_path / "out"
    with pytest.raises(InputError) as err:
        run_prep(load_prep_config(_config(tmp_path / "c.yaml", [good, dupes, bad]), output_dir=str(out)), progress=False)
    message = str(err.value)
    assert message.startswith("2 inputs yield no document")
    assert f"inputs[1] {dupes}: yields no document: all 5 of its records were skipped (duplicate_page_id 5)" in message
    assert f"inputs[2] {bad}: yields no document: all 3" in message and "inputs[0]" not in message
    assert _finished_outputs(out) == []


def test_skips_are_printed_at_the_end(local_ray, tmp_path, capsys):
    from data_prep.cli import _standalone

    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes(("\n".join(_lines(0, 30)) + "\n").encode("utf-8") + _broken_records())
    out = tmp_path / "out"
    assert _standalone(["--config", str(_config(tmp_path / "c.yaml", [mixed])), "--output", str(out), "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    report = out / "prep_report.json"
    assert f"skipped 3 records: bad_json 1, invalid_utf8 1, missing_field 1 (details: {report})\n" in stdout
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["skipped"] == json.loads(report.read_text())["counts"] == {"bad_json": 1, "invalid_utf8": 1, "missing_field": 1}
    assert summary["documents"] == 30 and _finished_outputs(out) == list(FINISHED)


def test_duplicate_key_in_prep_config_names_file_and_line(tmp_path):
    from data_prep.cli import _standalone

    good = tmp_path / "good.jsonl"
    good.write_text(_lines(0, 1)[0] + "\n", encoding="utf-8")
    path = tmp_path / "prep.yaml"
    # The second `path` of one input: YAML alone would train on whichever came last.
    path.write_text(f"inputs:\n  - path: {good}\n    format: jsonl\n    path: other.jsonl\noutput_dir: out\n")
    with pytest.raises(ConfigError, match=f"^{path}:4: duplicate key 'path' \\(first at line 2\\)"):
        load_prep_config(path)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# inputs: to do\n")
    with pytest.raises(ConfigError, match=f"^{empty}:1: the config is empty"):
        load_prep_config(empty)
    assert _standalone(["--config", str(path)]) == 2


def test_truncated_or_missing_later_shard_fails_at_the_first_batch(tmp_path):
    from nulls_megatron.train.loader import LoaderError, PackedLoader, check_shard_files, read_shard_index

    prep = write_prep_dir(tmp_path / "prep", documents=40, shards=4)
    check_shard_files(read_shard_index(prep))  # intact: nothing to say
    loader = PackedLoader(prep, 32, 2, vocab_size=VOCAB)
    order = loader.epoch_plan(0)[0]
    index = read_shard_index(prep)
    last = index.shards[int(order[-1])]  # read last in the epoch: without the check, found only there
    with open(last.path, "r+b") as f:
        f.truncate(last.bytes - 700)
    with pytest.raises(LoaderError) as err:
        next(loader)
    assert str(err.value) == (f"{last.path}: {last.bytes - 700} bytes on disk, {prep / SHARD_INDEX_NAME} says "
                              f"{last.bytes} (truncated: a partial copy or an interrupted write?)")
    gone = index.shards[int(order[-2])]
    gone.path.unlink()
    with pytest.raises(LoaderError) as err:
        next(PackedLoader(prep, 32, 2, vocab_size=VOCAB))
    lines = str(err.value).splitlines()  # every bad shard at once, in index order
    assert lines[0] == f"2 of 4 shards do not match {prep / SHARD_INDEX_NAME}:"
    missing = f"{gone.path}: shard listed in {prep / SHARD_INDEX_NAME} is missing"
    truncated = f"{last.path}: {last.bytes - 700} bytes on disk, {prep / SHARD_INDEX_NAME} says {last.bytes} "
    assert len(lines) == 3 and {missing} == {line for line in lines[1:] if line == missing}
    assert [line for line in lines[1:] if line.startswith(truncated)] != []

"""The prep job end to end, on real text: ../shared/data (a subset) + the gensim sample dump.

Ray runs for real (one session for the module); the SIGKILL test runs the job as a subprocess with
its own Ray, kills the whole process group after the first shards appear, restarts it and compares
every output file byte for byte with the uninterrupted run.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
import yaml

from data_prep.config import load_prep_config
from data_prep.documents import SkipReport
from data_prep.manifest import Manifest, number_sources
from data_prep.readers import InputSpec, plan_chunks, read_chunk
from data_prep.shards import estimate_sample_bytes, plan_shards, read_shard, write_shard
from data_prep.tokenizer import token_dtype
from nulls_megatron.config import ConfigError
from tests.data_required import require_shared_data

REPO = Path(__file__).resolve().parents[1]
SHARED = require_shared_data()
# The project's venv first on PATH, as for a user who activated it: `ray` and `nulls` resolve there.
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


@pytest.fixture(scope="module")
def ray_session():
    import ray

    from data_prep.config import RayConfig
    from data_prep.ray_session import connect_ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    connect_ray(RayConfig(num_cpus=2))  # the prep's own start: loopback only, retried on a busy machine
    yield
    ray.shutdown()


def _write_config(path: Path, inputs: list[dict], **extra) -> Path:
    cfg = {"inputs": inputs, "output_dir": str(path.parent / "unused"), "chunk_bytes": 262144,
           "tokenizer": {"vocab_size": 1000, "sample_chars": 2_000_000, "sample_chunks": 16, "num_threads": 1},
           "shards": {"target_bytes": 65536}, "ray": {"num_cpus": 2}, **extra}
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Inputs: 120 + 40 JSONL articles (10 shared by both files: duplicate page ids), WikiText-2 valid, the
    XML export, two Sherlock Holmes books as one group (the two shortest: the five cost a minute of encoding
    in each of three full runs), the gensim dump."""
    d = tmp_path_factory.mktemp("corpus")
    lines = (SHARED / "enwiki" / "articles_2018.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (d / "a.jsonl").write_text("".join(lines[:120]), encoding="utf-8")
    (d / "b.jsonl").write_text("".join(lines[110:150]), encoding="utf-8")
    (d / "books").mkdir()
    for name in ("01_a_study_in_scarlet.txt", "02_the_sign_of_the_four.txt"):
        shutil.copyfile(SHARED / "books" / "sherlock_holmes" / name, d / "books" / name)
    inputs = {
        "a": {"path": str(d / "a.jsonl"), "format": "jsonl"},
        "wikitext": {"path": str(SHARED / "wikitext2" / "valid.txt"), "format": "wikitext"},
        "xml": {"path": str(SHARED / "enwiki" / "paintings_export_2017.xml"), "format": "mediawiki"},
        "books": {"path": str(d / "books"), "format": "books", "group": "sherlock_holmes"},
        "gensim": {"path": "gensim:enwiki-sample", "format": "mediawiki"},
        "b": {"path": str(d / "b.jsonl"), "format": "jsonl"},
    }
    full = _write_config(d / "full.yaml", list(inputs.values()))
    return {"dir": d, "inputs": inputs, "full": full}


@pytest.fixture(scope="module")
def full_run(ray_session, corpus, tmp_path_factory):
    from data_prep.pipeline import run_prep

    out = tmp_path_factory.mktemp("full") / "out"
    summary = run_prep(load_prep_config(corpus["full"], output_dir=str(out)), progress=False)
    return out, summary


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _shard_samples(out: Path) -> list[tuple[str, dict]]:
    return [(tar.name, s) for tar in sorted((out / "shards").glob("*.tar")) for s in read_shard(tar)]


def test_shards_match_manifest(full_run, corpus):
    out, summary = full_run
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [r["source_index"] for r in manifest] == list(range(len(manifest)))
    assert all(r["present"] for r in manifest) and len(manifest) == summary["documents"] > 300
    index = json.loads((out / "shard_index.json").read_text())
    for info in index["shards"]:  # the index's checksums and counts are the files'
        assert hashlib.sha256((out / "shards" / info["name"]).read_bytes()).hexdigest() == info["sha256"]
    samples = _shard_samples(out)
    seen = [s["meta"]["source_index"] for _, s in samples]
    assert seen == list(range(len(manifest)))  # every source exactly once, in order
    for shard_name, s in samples:
        row = manifest[s["meta"]["source_index"]]
        assert s["__key__"] == f"{row['source_index']:010d}"
        assert (s["meta"]["title"], s["meta"]["key"]) == (row["title"], row["key"])
        assert len(s["tokens"]) == row["n_tokens"] > 0 and s["tokens"].dtype == np.uint16
        assert shard_name == f"shard-{row['shard']:06d}.tar"
    assert sum(len(s["tokens"]) for _, s in samples) == index["tokens"] == summary["tokens"]
    assert [r["documents"] for r in index["shards"]] == [sum(1 for n, _ in samples if n == i["name"]) for i in index["shards"]]
    report = json.loads((out / "prep_report.json").read_text())
    assert report["counts"]["duplicate_page_id"] == 10 and report["counts"]["redirect"] > 0
    dups = [e for e in report["entries"] if e["reason"] == "duplicate_page_id"]
    assert len(dups) == 10 and {e["file"] for e in dups} == {corpus["inputs"]["b"]["path"]}
    books = [r for r in manifest if r["key"].startswith("book:")]
    assert len(books) == 2 and {r["group"] for r in books} == {"sherlock_holmes"}
    # Token content: every JSONL document's tokens are its cleaned text, encoded, and decode back to it.
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    by_key = {s["meta"]["key"]: s["tokens"] for _, s in samples}
    spec = InputSpec(corpus["inputs"]["a"]["path"], "jsonl")
    docs = [d for c in plan_chunks([spec]) for d in read_chunk(c, SkipReport())]
    assert len(docs) == 120
    for doc in docs:
        assert by_key[doc.key].tolist() == sp.encode(doc.text) and sp.decode(by_key[doc.key].tolist()) == doc.text


def test_title_lookup(full_run, capsys):
    out, _ = full_run
    m = Manifest(out)
    rows = m.table(["source_index", "title", "key"]).to_pylist()
    for r in rows[::37]:
        assert r["source_index"] in m.lookup_title(r["title"])
        assert r["source_index"] in m.lookup_title(r["title"].replace(" ", "_"))
    anarchism = m.lookup_title("anarchism")  # MediaWiki: the first letter is case-insensitive
    assert [m.row(i)["key"] for i in anarchism] == ["wiki:12"]
    assert m.lookup_title("No such article, surely") == []
    from data_prep.manifest import main

    assert main([str(out), "Anarchism"]) == 0 and '"wiki:12"' in capsys.readouterr().out


def test_rerun_identical_and_append_rule(ray_session, corpus, full_run, tmp_path):
    from data_prep.pipeline import run_prep

    inp, model = corpus["inputs"], str(full_run[0] / "tokenizer.model")
    out = tmp_path / "out"

    def run(*names):
        path = _write_config(tmp_path / "c.yaml", [inp[n] for n in names], tokenizer={"model_path": model})
        return run_prep(load_prep_config(path, output_dir=str(out)), progress=False)

    run("a", "wikitext")
    first = _snapshot(out)
    assert not (out / "work").exists()
    run("a", "wikitext")  # same inputs, the previous manifest as base: byte-identical
    assert _snapshot(out) == first
    m1 = pq.read_table(out / "manifest.parquet").to_pylist()
    summary = run("a", "wikitext", "b")  # a later dump part: new keys appended, old indices kept
    m2 = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [r["key"] for r in m2[: len(m1)]] == [r["key"] for r in m1]
    assert len(m2) == len(m1) + 30 and summary["new_sources"] == 30
    assert all(r["input_index"] == 2 for r in m2[len(m1):])
    run("wikitext")  # an input dropped: its sources stay, absent; no index is reused
    m3 = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [r["key"] for r in m3] == [r["key"] for r in m2]
    absent = [r for r in m3 if not r["present"]]
    assert {r["key"].split(":")[0] for r in absent} == {"wiki"} and len(absent) == 150
    assert all(r["shard"] is None and r["n_tokens"] == 0 for r in absent)
    kept = [s["meta"]["source_index"] for _, s in _shard_samples(out)]
    assert kept == [r["source_index"] for r in m3 if r["present"]]


def _run_until(cmd: list[str], log: Path, ready) -> None:
    """Start the prep CLI and SIGKILL it (with the Ray it started: its whole process group) once ready()."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
        try:
            deadline = time.monotonic() + 240
            while not ready() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert ready(), log.read_text()[-3000:]


def test_sigkill_then_resume_is_byte_identical(full_run, corpus, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "data_prep.cli", "--config", str(corpus["full"]), "--output", str(out), "--no-progress"]
    # Killed in the encode phase (after the first finished chunk), then in the shard phase (after the
    # first shard), on one worker (two in the uninterrupted run: the bytes must not depend on it either).
    _run_until([*cmd, "ray.num_cpus=1"], tmp_path / "first.log", lambda: any((out / "work" / "chunks").glob("*.done")))
    assert not (out / "shards").exists()
    _run_until([*cmd, "ray.num_cpus=1"], tmp_path / "second.log", lambda: any((out / "shards").glob("*.tar")))
    assert not (out / "prep_report.json").exists(), "the run finished before the kill: nothing was resumed"
    # The resuming run as a laptop user starts it (RAY_AUTH_MODE unset): Ray keeps token authentication on
    # and does not warn about it.
    laptop = {k: v for k, v in ENV.items() if k != "RAY_AUTH_MODE"}
    done = subprocess.run(cmd, env=laptop, capture_output=True, text=True, cwd=REPO, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Token authentication" not in done.stdout + done.stderr, done.stderr[-2000:]
    expected, got = _snapshot(full_run[0]), _snapshot(out)
    assert sorted(got) == sorted(expected)
    assert [name for name in expected if expected[name] != got[name]] == []


def _error(tmp_path: Path, data: dict) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_prep_config(path)
    return str(err.value)


def test_bad_config_errors_name_the_field(tmp_path, capsys):
    ok = {"path": str(SHARED / "wikitext2" / "valid.txt")}
    assert "inputs" in _error(tmp_path, {"inputs": []})
    assert "tokenizer.vocab_size" in _error(tmp_path, {"inputs": [ok], "tokenizer": {"vocab_size": "big"}})
    assert "did you mean tokenizer.vocab_size" in _error(tmp_path, {"inputs": [ok], "tokenizer": {"vocab_sise": 9}})
    assert "tokenizer.model_type" in _error(tmp_path, {"inputs": [ok], "tokenizer": {"model_type": "wordpiece"}})
    assert "inputs[1].path" in _error(tmp_path, {"inputs": [ok, {"path": "no/such/file.xml"}]})
    assert "inputs[0].format" in _error(tmp_path, {"inputs": [{**ok, "format": "docx"}]})
    assert "shards.target_bytes" in _error(tmp_path, {"inputs": [ok], "shards": {"target_bytes": 0}})
    assert "tokenizer.model_path" in _error(tmp_path, {"inputs": [ok], "tokenizer": {"model_path": "none.model"}})
    from data_prep.cli import _standalone

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"inputs": [ok], "ray": {"num_cpus": 0}}))
    assert _standalone(["--config", str(bad)]) == 2 and "ray.num_cpus" in capsys.readouterr().err


def test_vocab_too_large_for_the_sample_names_the_field(ray_session, tmp_path):
    from data_prep.pipeline import run_prep

    path = _write_config(tmp_path / "c.yaml", [{"path": str(SHARED / "enwiki" / "paintings_export_2017.xml")}],
                         tokenizer={"vocab_size": 60000, "sample_chars": 20000})
    with pytest.raises(ValueError, match="tokenizer.vocab_size"):
        run_prep(load_prep_config(path, output_dir=str(tmp_path / "out")), progress=False)


def test_shard_bytes_are_what_the_plan_estimates(tmp_path):
    """Shards are cut by estimated bytes, so the estimate must be the tar's real layout: two plain ustar
    headers per sample and no pax extended headers (a float mtime made tarfile add one per member,
    1 KiB more per file, doubling the size of a shard of short documents)."""
    import tarfile

    lengths = np.array([1, 10, 250, 1000, 3])
    samples = [(i, np.arange(n, dtype=np.uint16), f"Title {i}", f"wiki:{i}") for i, n in enumerate(lengths)]
    info = write_shard(tmp_path / "s.tar", 0, samples)
    with tarfile.open(tmp_path / "s.tar") as tar:
        members = tar.getmembers()
    assert len(members) == 2 * len(lengths) and all(m.pax_headers == {} for m in members)
    assert all(m.mtime == 0 and m.uname == "nulls" for m in members)
    payload = int(estimate_sample_bytes(lengths, 2).sum()) + 2 * 512  # + the end-of-archive blocks
    assert info.bytes == (tmp_path / "s.tar").stat().st_size == -(-payload // tarfile.RECORDSIZE) * tarfile.RECORDSIZE
    assert [int(s["meta"]["source_index"]) for s in read_shard(tmp_path / "s.tar")] == list(range(len(lengths)))


def test_numbering_rule_and_shard_plan_units():
    import pyarrow as pa

    idx, n = number_sources(pa.array(["b", "a", "b", "c"]))
    assert idx.tolist() == [0, 1, -1, 2] and n == 3
    idx, n = number_sources(pa.array(["x", "c", "x"]), base_keys=pa.array(["a", "b", "c"]))
    assert idx.tolist() == [3, 2, -1] and n == 4
    sizes = estimate_sample_bytes(np.array([10, 1000, 10]), 2)
    assert sizes.tolist() == [2048, 4096, 2048] and plan_shards(sizes, 4096).tolist() == [0, 0, 1] and plan_shards(sizes, 10**9).tolist() == [0, 0, 0]
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    from launch.ray_job import build_entrypoint

    assert build_entrypoint(str(REPO / "configs" / "prep_gensim_sample.yaml"), "/data/out", ["a.b=1"]) == (
        "nulls prep --config configs/prep_gensim_sample.yaml --no-progress --output /data/out a.b=1")
    from launch.ray_job import build_train_entrypoint

    assert build_train_entrypoint(str(REPO / "configs" / "demo_cpu.yaml"), 4, ["train.data=/d x"], module=True) == (
        "python -m nulls_megatron.cli train --config configs/demo_cpu.yaml --nproc 4 --set 'train.data=/d x'")
    with pytest.raises(ValueError, match="inside the working dir"):
        build_entrypoint("/elsewhere/x.yaml")


def test_ray_job_submission(tmp_path, corpus):
    """Submit the prep as a Ray Job to a real local head. Needs the dashboard (ray[default])."""
    try:
        import aiohttp  # noqa: F401  the job API server lives in the dashboard, which needs ray[default]
    except ImportError:
        pytest.skip("ray[default] is not installed (no aiohttp): `ray start --head` cannot serve the job API here")
    import ray

    from launch.env import find_free_port
    from launch.ray_job import submit_prep_job, submit_train_job, wait_for_job
    from tests.train_helpers import train_config

    # Free the 2 cores of this module's in-process Ray: the head's job agent starts slowly beside it.
    ray.shutdown()

    port, dash = find_free_port(), find_free_port()
    head = subprocess.Popen(["ray", "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}"],
                            env=ENV, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cfg = REPO / "configs" / f".test_ray_job_{os.getpid()}.yaml"
    train_cfg = REPO / "configs" / f".test_ray_train_{os.getpid()}.yaml"
    try:
        _write_config(REPO / "configs" / f".test_ray_job_{os.getpid()}.yaml", [corpus["inputs"]["wikitext"]])
        deadline = time.monotonic() + 180  # the job agent comes up well after the head on 2 busy cores
        while True:
            try:
                client, job = submit_prep_job(f"http://127.0.0.1:{dash}", str(cfg), output=str(tmp_path / "out"),
                                              module=True, env_vars={"RAY_AUTH_MODE": "disabled"})
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        assert wait_for_job(client, job, timeout_s=180) == "SUCCEEDED", client.get_job_logs(job)
        assert (tmp_path / "out" / "manifest.parquet").is_file()
        # Then train on what the job wrote, as a second job on the same head (2 CPU ranks, torchrun).
        tiny = train_config(tmp_path / "out", tmp_path / "train", train={"steps": 2, "save_every": 0}).to_dict()
        tiny["model"]["vocab_size"] = 1000  # the prep config's tokenizer
        train_cfg.write_text(yaml.safe_dump(tiny))
        client, job = submit_train_job(f"http://127.0.0.1:{dash}", str(train_cfg), nproc=2, module=True,
                                       env_vars={"RAY_AUTH_MODE": "disabled"})
        assert wait_for_job(client, job, timeout_s=300) == "SUCCEEDED", client.get_job_logs(job)
        assert "step 2/2 (100.0%)" in client.get_job_logs(job)
        assert (tmp_path / "train" / "checkpoints" / "latest").read_text().strip() == "step-000000002"
    finally:
        cfg.unlink(missing_ok=True)
        train_cfg.unlink(missing_ok=True)
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)

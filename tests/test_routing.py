"""Nearest-source routing: the MiniLM title index of a checkpoint, stored, checked and queried."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nulls_megatron.routing.build import build_index, checkpoint_sources, opening_batches, title_batches
from nulls_megatron.routing.embedder import DIM, MODEL_NAME, embed
from nulls_megatron.routing.source_index import (
    RoutingIndexError, RoutingIndexMissing, SourceIndex, index_dir,
)

ROOT = Path(__file__).resolve().parent.parent


def _titles(prep_dir: Path) -> list[str]:
    return [t for _, batch in title_batches(prep_dir) for t in batch]


def _set_off(checkpoint: Path, disabled: list[int], suppressed: list[int] = ()) -> None:
    """Mark sources off in the sink manifest (its digests cover only the .safetensors files)."""
    path = checkpoint / "sinks" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["disabled_sources"], manifest["suppressed_sources"] = list(disabled), list(suppressed)
    path.write_text(json.dumps(manifest, indent=1))


@pytest.fixture(scope="module")
def indexed(trained_run, tmp_path_factory):
    """A private copy of the trained run whose checkpoint has a title index."""
    run = trained_run.copy_to(tmp_path_factory.mktemp("routing"))
    info = build_index(run.checkpoint, "title", progress=False)
    return run, info


def test_title_index_is_stored_reloaded_and_routes_titles_to_themselves(indexed):
    run, info = indexed
    folder = index_dir(run.checkpoint)
    src = checkpoint_sources(run.checkpoint)
    assert info == json.loads((folder / "index.json").read_text())
    assert info["kind"] == "title" and info["model"] == MODEL_NAME and info["dim"] == DIM
    assert info["sources"] == src.n_sources == 40 and info["sources_manifest_sha256"] == src.manifest_sha256
    assert not [p.name for p in run.checkpoint.iterdir() if p.name.startswith(".")]  # no temp debris
    # The checkpoint still verifies (`nulls checkpoint verify`, training resume): the index is derived data
    # with its own sha256 in index.json, outside digests.json.
    from nulls_megatron.checkpoint.digests import read_digests, verify_share

    assert not any(n.startswith("routing/") for n in read_digests(run.checkpoint)) and verify_share(run.checkpoint) == []

    index = SourceIndex.open(run.checkpoint, src.manifest_sha256, verify=True)
    from safetensors.numpy import load_file

    stored = load_file(str(folder / "embeddings.safetensors"))["embeddings"]  # a standard safetensors file
    assert stored.dtype == np.float16 and stored.shape == (40, DIM)
    np.testing.assert_array_equal(stored, np.asarray(index.embeddings))
    np.testing.assert_allclose(np.linalg.norm(stored.astype(np.float32), axis=1), 1.0, atol=2e-3)

    # Each title's own embedding routes to its own source, at cosine ~1.
    titles = _titles(src.prep_dir)
    queries = embed(titles)
    chosen, scores = index.nearest(queries)
    np.testing.assert_array_equal(chosen, np.arange(40))
    assert scores.min() > 0.99

    # Batched (one block) equals one query at a time, and tiny chunks/blocks equal the defaults.
    prompts = ["a school in Shanghai", "football season in Angola", "a Nigerian businessman", "river"] + titles[:6]
    q = embed(prompts)
    batched = index.nearest(q)
    singles = [index.nearest(q[i : i + 1]) for i in range(len(prompts))]
    np.testing.assert_array_equal(batched[0], [s[0][0] for s in singles])
    np.testing.assert_allclose(batched[1], [s[1][0] for s in singles], atol=1e-5)
    chunked = index.nearest(q, chunk_rows=7, query_block=3)
    np.testing.assert_array_equal(batched[0], chunked[0])
    np.testing.assert_allclose(batched[1], chunked[1], atol=1e-5)
    np.testing.assert_array_equal(index.route_texts(prompts)[0], batched[0])


def test_missing_stale_and_damaged_index_are_refused(indexed, trained_run, tmp_path):
    run, _ = indexed
    src = checkpoint_sources(run.checkpoint)
    fresh = trained_run.copy_to(tmp_path)  # copied from the shared run: no index
    with pytest.raises(RoutingIndexMissing, match=r"routing/index\.json.*nulls route-index"):
        SourceIndex.open(fresh.checkpoint, src.manifest_sha256)

    # An index built for another sources manifest (a re-run prep may renumber sources).
    stale = fresh.checkpoint / "routing"
    stale.mkdir()
    for name in ("index.json", "embeddings.safetensors"):
        (stale / name).write_bytes((index_dir(run.checkpoint) / name).read_bytes())
    info = json.loads((stale / "index.json").read_text())
    info["sources_manifest_sha256"] = "0" * 64
    (stale / "index.json").write_text(json.dumps(info))
    with pytest.raises(RoutingIndexError, match=rf"{stale / 'index.json'}.*0000.*{src.manifest_sha256}.*nulls route-index"):
        SourceIndex.open(fresh.checkpoint, src.manifest_sha256)

    # A truncated embeddings file.
    info["sources_manifest_sha256"] = src.manifest_sha256
    (stale / "index.json").write_text(json.dumps(info))
    data = (stale / "embeddings.safetensors").read_bytes()
    (stale / "embeddings.safetensors").write_bytes(data[:-100])
    with pytest.raises(RoutingIndexError, match=r"embeddings\.safetensors.*truncated"):
        SourceIndex.open(fresh.checkpoint, src.manifest_sha256)

    # `nulls route-index` replaces the damaged index (in process: MiniLM is already loaded).
    from nulls_megatron.cli import main

    assert main(["route-index", str(fresh.checkpoint), "--no-progress"]) == 0
    assert SourceIndex.open(fresh.checkpoint, src.manifest_sha256, verify=True).kind == "title"
    from nulls_megatron.checkpoint.digests import verify_share

    assert verify_share(fresh.checkpoint) == []  # the index is not part of the checkpoint's digests
    assert not [p.name for p in fresh.checkpoint.iterdir() if p.name.startswith(".")]


def test_forgotten_and_suppressed_sources_are_never_chosen(indexed, tmp_path):
    run, _ = indexed
    off, suppressed = [0, 1, 2, 3, 4], [5]
    _set_off(run.checkpoint, off, suppressed)
    try:
        src = checkpoint_sources(run.checkpoint)
        assert src.state.off_sources() == off + suppressed
        index = SourceIndex.open(run.checkpoint, src.manifest_sha256)
        titles = _titles(src.prep_dir)
        chosen, scores = index.route_texts(titles, exclude=src.state.off_sources())
        assert not set(chosen[:6].tolist()) & set(off + suppressed)
        np.testing.assert_array_equal(chosen[6:], np.arange(6, 40))  # the survivors still route to themselves
        assert (scores[:6] < 0.99).all()
        with pytest.raises(ValueError, match="every one of the 40 sources"):
            index.nearest(embed(["anything"]), exclude=range(40))
    finally:
        _set_off(run.checkpoint, [], [])


def test_opening_index_and_the_command(indexed, tmp_path):
    run, _ = indexed
    src = checkpoint_sources(run.checkpoint)
    openings: dict[int, str] = {}
    for sources, texts in opening_batches(src.prep_dir, n_tokens=16):
        openings.update(zip(sources.tolist(), texts))
    assert sorted(openings) == list(range(40))
    titles = _titles(src.prep_dir)
    # Real articles open with their title line; 16 tokens decode to a short prefix of it.
    assert sum(openings[i].strip().startswith(titles[i][:8]) for i in range(40)) >= 35

    from nulls_megatron.cli import main

    assert main(["route-index", str(run.checkpoint), "--from", "opening", "--opening-tokens", "32", "--no-progress"]) == 0
    index = SourceIndex.open(run.checkpoint, src.manifest_sha256)
    assert index.kind == "opening" and index.info["opening_tokens"] == 32
    chosen, _ = index.route_texts(titles)
    assert (chosen == np.arange(40)).mean() >= 0.9
    build_index(run.checkpoint, "title", progress=False)  # back to the title index for the other tests
    assert SourceIndex.open(run.checkpoint, src.manifest_sha256).kind == "title"


def test_routing_imports_no_training_code():
    code = ("import sys, nulls_megatron.routing.build, nulls_megatron.routing.cli, nulls_megatron.routing.source_index; "
            "bad = [m for m in sys.modules if m.split('.')[0] == 'megatron' or m.startswith('nulls_megatron.train') "
            "or m.startswith('nulls_megatron.model')]; print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout + out.stderr

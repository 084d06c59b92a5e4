"""PackedLoader on real shards: written by data_prep.shards.write_shard (the prep's own writer) with a
shard index from shard_index_json, holding real Wikipedia text (../shared/data) tokenized as UTF-8 bytes.
"""
from __future__ import annotations

import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.shards import SHARD_DIR, SHARD_INDEX_NAME, read_shard, shard_index_json, shard_name, write_shard
from nulls_megatron.train.loader import LoaderError, PackedLoader, read_shard_index, scan_tar
from nulls_megatron.train.packing import TENSOR_FIELDS, PackedRows
from tests.data_required import require_shared_data

ARTICLES = require_shared_data("enwiki", "articles_2018.jsonl")
SHARD_SIZES = [17, 4, 23, 11, 30, 5]  # uneven, so blocks of ranks straddle shards
LONG_TOKENS = 3000
VOCAB = 512
FIELDS = list(TENSOR_FIELDS)


@pytest.fixture(scope="module")
def prep_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prep")
    (out / SHARD_DIR).mkdir()
    rng = np.random.default_rng(0)
    with open(ARTICLES, encoding="utf-8") as f:
        articles = [json.loads(line) for _, line in zip(range(sum(SHARD_SIZES)), f)]
    docs = []
    for i, a in enumerate(articles):
        data = np.frombuffer(a["text"].encode("utf-8"), dtype=np.uint8).astype(np.uint16)
        n = LONG_TOKENS if i == 5 else 1 if i % 29 == 3 else int(rng.integers(2, 300))
        docs.append((i + i // 7, data[:n], a["title"], f"wiki:{a['id']}"))  # gaps: absent sources
    assert len(docs[5][1]) == LONG_TOKENS
    infos, start = [], 0
    for shard, size in enumerate(SHARD_SIZES):
        infos.append(write_shard(out / SHARD_DIR / shard_name(shard), shard, docs[start : start + size]))
        start += size
    (out / SHARD_INDEX_NAME).write_bytes(shard_index_json(infos, "uint16", "0" * 64))
    return out


@pytest.fixture(scope="module")
def documents(prep_dir) -> dict[int, np.ndarray]:
    """source -> tokens, read back with the prep's own reader."""
    return {int(s["meta"]["source_index"]): s["tokens"] for p in sorted((prep_dir / SHARD_DIR).glob("*.tar")) for s in read_shard(p)}


def take(loader: PackedLoader, n: int) -> list[PackedRows]:
    return [next(loader) for _ in range(n)]


def same(a: PackedRows, b: PackedRows) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in FIELDS)


def labelled(batches: list[PackedRows]) -> Counter:
    """(source, input token, label) of every position that is trained on."""
    rows = PackedRows.stack(batches)
    keep = rows.loss_mask.flatten() > 0
    return Counter(zip(rows.source_ids.flatten()[keep].tolist(), rows.tokens.flatten()[keep].tolist(),
                       rows.labels.flatten()[keep].tolist()))


def test_order_is_fixed_by_the_seed(prep_dir):
    a, b = take(PackedLoader(prep_dir, 32, 4, vocab_size=VOCAB, seed=7), 6), take(PackedLoader(prep_dir, 32, 4, vocab_size=VOCAB, seed=7), 6)
    assert all(same(x, y) for x, y in zip(a, b))
    assert a[0].tokens.shape == (4, 32) and a[0].tokens.dtype == torch.int64
    c = take(PackedLoader(prep_dir, 32, 4, vocab_size=VOCAB, seed=8), 6)
    assert not all(torch.equal(x.source_ids, y.source_ids) for x, y in zip(a, c))
    # the next epoch has an order of its own
    loader = PackedLoader(prep_dir, 32, 4, vocab_size=VOCAB, seed=7)
    plans = [loader.epoch_plan(e)[0].tolist() for e in range(4)]
    perms = [loader.shard_permutation(e, 2).tolist() for e in range(4)]
    assert len({tuple(p) for p in plans}) > 1 and len({tuple(p) for p in perms}) > 1


@pytest.mark.parametrize("dp_world", [1, 2, 3])
def test_ranks_are_disjoint_and_cover_every_label_of_the_epoch_once(prep_dir, documents, dp_world):
    expected = Counter((s, int(a), int(b)) for s, t in documents.items() for a, b in zip(t[:-1], t[1:]))
    index = read_shard_index(prep_dir)
    assert sum(expected.values()) == index.tokens - index.documents  # n - 1 labels per document
    got, sources, blocks = Counter(), [], []
    for rank in range(dp_world):
        loader = PackedLoader(prep_dir, 32, 4, vocab_size=VOCAB, seed=3, dp_rank=rank, dp_world=dp_world, epochs=1)
        batches = list(loader)
        assert all(len(b) == 4 for b in batches[:-1]) and 1 <= len(batches[-1]) <= 4
        got += labelled(batches)
        sources.append(set(PackedRows.stack(batches).source_ids.unique().tolist()))
        _, _, lo, hi = loader.epoch_plan(0)
        blocks.append(hi - lo)
    assert got == expected
    assert sum(map(len, sources)) == len(documents) == sum(blocks)  # disjoint, every document once
    assert set().union(*sources) == set(documents)
    assert max(blocks) - min(blocks) <= 1  # remainder documents go one each to some ranks, none dropped


def test_resume_is_bit_exact_mid_epoch_and_across_the_epoch_boundary(prep_dir):
    def loader() -> PackedLoader:
        return PackedLoader(prep_dir, 32, 3, vocab_size=VOCAB, seed=5, dp_rank=1, dp_world=2)

    straight, states = loader(), [loader().state_dict()]
    batches = []
    while states[-1]["epoch"] < 2:  # two full epochs of this rank
        batches.append(next(straight))
        states.append(json.loads(json.dumps(straight.state_dict())))
    boundary = next(i for i, s in enumerate(states) if s["epoch"] == 1)
    mid_document = next(i for i, s in enumerate(states) if s["offset"] > 0)
    for n in sorted({0, mid_document, boundary // 2, boundary - 1, boundary, boundary + 1, len(batches) - 8}):
        resumed = loader()
        resumed.load_state_dict(states[n])
        for k in range(8):
            assert same(next(resumed), batches[n + k]), f"batch {n + k} differs after resuming at {n}"
            assert resumed.state_dict() == states[n + k + 1]
    # a resumed loader may use a different batch size: the row stream is the same
    resumed = PackedLoader(prep_dir, 32, 1, vocab_size=VOCAB, seed=5, dp_rank=1, dp_world=2)
    resumed.load_state_dict(states[boundary])
    assert same(PackedRows.stack(take(resumed, 6)), PackedRows.stack(batches[boundary : boundary + 2]))
    for field, value in (("seed", 6), ("dp_world", 3), ("index_sha256", "x")):
        with pytest.raises(ValueError, match=f"loader state has {field}="):
            loader().load_state_dict({**states[3], field: value})


def test_a_long_document_continues_across_rows_with_its_source(prep_dir, documents):
    long_source = next(s for s, t in documents.items() if len(t) == LONG_TOKENS)
    rows = PackedRows.stack(list(PackedLoader(prep_dir, 64, 2, vocab_size=VOCAB, seed=0, epochs=1)))
    full = [i for i in range(len(rows)) if bool((rows.source_ids[i] == long_source).all())]
    assert len(full) >= LONG_TOKENS // 64 - 2 and full == list(range(full[0], full[-1] + 1))  # consecutive rows
    for i in full:
        assert rows.loss_mask[i].all() and (rows.document_ids[i] == 0).all()
        assert rows.tokens[i + 1, 0] == rows.labels[i, -1]  # the next row starts with the last label
    mine = rows.source_ids == long_source
    assert int(rows.loss_mask[mine].sum()) == LONG_TOKENS - 1
    assert torch.equal(rows.tokens[mine][: LONG_TOKENS], torch.from_numpy(documents[long_source].astype(np.int64))[: int(mine.sum())])


def test_tar_scan_agrees_with_tarfile(prep_dir):
    for path in sorted((prep_dir / SHARD_DIR).glob("*.tar")):
        with open(path, "rb") as f, tarfile.open(path) as tar:
            assert scan_tar(f, path) == [(m.name, m.offset_data, m.size) for m in tar.getmembers()]


def _copy(prep_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(prep_dir, tmp_path / "copy"))


def test_errors_name_the_file(prep_dir, tmp_path):
    with pytest.raises(LoaderError, match=f"{tmp_path}/{SHARD_INDEX_NAME}: shard index not found"):
        PackedLoader(tmp_path, 32, 2, vocab_size=VOCAB)
    copy = _copy(prep_dir, tmp_path)
    missing = copy / SHARD_DIR / shard_name(3)
    missing.unlink()
    with pytest.raises(LoaderError, match=f"{missing}: shard listed in {copy / SHARD_INDEX_NAME} is missing"):
        list(PackedLoader(copy, 32, 2, vocab_size=VOCAB, epochs=1))
    shutil.copy(prep_dir / SHARD_DIR / shard_name(3), missing)
    blob = bytearray(missing.read_bytes())
    with open(missing, "rb") as f:
        _, at, size = next(m for m in scan_tar(f, missing) if m[0].endswith(".tokens.npy") and m[2] > 140)
    blob[at + 130] ^= 1  # a token's low byte, past the 128-byte npy header
    missing.chmod(0o644)
    missing.write_bytes(bytes(blob))
    with pytest.raises(LoaderError, match=f"{missing}: sha256 [0-9a-f]{{64}} does not match {copy / SHARD_INDEX_NAME}"):
        list(PackedLoader(copy, 32, 2, vocab_size=VOCAB, epochs=1))
    list(PackedLoader(copy, 32, 2, vocab_size=VOCAB, epochs=1, verify=False))  # unverified: the flipped byte is read
    with pytest.raises(LoaderError, match=rf"shard-\d{{6}}\.tar: sample \d{{10}}: token id (\d+) at position \d+ >= vocab size 100") as err:
        list(PackedLoader(prep_dir, 32, 2, vocab_size=100, epochs=1))
    assert int(err.value.args[0].split("token id ")[1].split()[0]) >= 100
    index = json.loads((copy / SHARD_INDEX_NAME).read_text())
    index["shards"][1]["documents"] = "four"
    (copy / SHARD_INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(LoaderError, match=r"shard_index.json: shards\[1\].documents: missing or not a int"):
        PackedLoader(copy, 32, 2, vocab_size=VOCAB)
    with pytest.raises(LoaderError, match=f"{sum(SHARD_SIZES)} documents cannot feed 100 data-parallel ranks"):
        PackedLoader(prep_dir, 32, 2, vocab_size=VOCAB, dp_rank=0, dp_world=100)
    with pytest.raises(ValueError, match=r"dp_rank must be in \[0, 2\), got 2"):
        PackedLoader(prep_dir, 32, 2, vocab_size=VOCAB, dp_rank=2, dp_world=2)


def test_documents_cut_to_max_document_tokens_and_resumed_exactly(prep_dir, documents):
    cut = 40
    expected = Counter((s, int(a), int(b)) for s, t in documents.items() for a, b in zip(t[:cut - 1], t[1:cut]))
    loader = PackedLoader(prep_dir, 32, 4, vocab_size=VOCAB, seed=3, epochs=1, max_document_tokens=cut)
    batches = list(loader)
    assert labelled(batches) == expected  # every document's first `cut` tokens, nothing beyond
    straight = PackedLoader(prep_dir, 32, 2, vocab_size=VOCAB, seed=3, max_document_tokens=cut)
    take(straight, 3)
    state = json.loads(json.dumps(straight.state_dict()))
    ahead = take(straight, 4)
    resumed = PackedLoader(prep_dir, 32, 2, vocab_size=VOCAB, seed=3, max_document_tokens=cut)
    resumed.load_state_dict(state)
    assert all(same(a, b) for a, b in zip(ahead, take(resumed, 4)))
    with pytest.raises(ValueError, match="loader state has max_document_tokens=40, this loader 0"):
        PackedLoader(prep_dir, 32, 2, vocab_size=VOCAB, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="max_document_tokens must be >= 0"):
        PackedLoader(prep_dir, 32, 2, vocab_size=VOCAB, max_document_tokens=-1)


def test_prefetching_hands_out_the_same_batches_and_checkpoints_what_it_handed_out(prep_dir, tmp_path):
    from nulls_megatron.train.prefetch import PrefetchLoader

    def plain() -> PackedLoader:
        return PackedLoader(prep_dir, 32, 3, vocab_size=VOCAB, seed=7, dp_rank=0, dp_world=2)

    reference, states = plain(), []
    batches = []
    for _ in range(12):
        batches.append(next(reference))
        states.append(reference.state_dict())
    ahead = PrefetchLoader(plain(), depth=4)
    assert ahead.state_dict() == plain().state_dict()
    for k in range(5):
        assert same(next(ahead), batches[k])
        assert ahead.state_dict() == states[k], "the state counts batches handed out, not read ahead"
    ahead.close()  # rewinds the inner loader past the read-ahead batches
    assert same(next(ahead), batches[5]) and ahead.state_dict() == states[5]
    resumed = PrefetchLoader(plain(), depth=2)
    resumed.load_state_dict(states[7])
    assert all(same(next(resumed), b) for b in batches[8:12])
    resumed.close()
    with pytest.raises(ValueError, match="prefetch depth must be >= 1"):
        PrefetchLoader(plain(), depth=0)
    # An error in the reading thread reaches the consumer, with the file named.
    copy = _copy(prep_dir, tmp_path)
    (copy / SHARD_DIR / shard_name(2)).unlink()
    failing = PrefetchLoader(PackedLoader(copy, 32, 2, vocab_size=VOCAB, epochs=1))
    with pytest.raises(LoaderError, match=f"{shard_name(2)}: shard listed in .* is missing"):
        list(failing)
    finite = PrefetchLoader(PackedLoader(prep_dir, 32, 4, vocab_size=VOCAB, seed=3, epochs=1))
    assert sum(len(b) for b in finite) == sum(len(b) for b in PackedLoader(prep_dir, 32, 4, vocab_size=VOCAB, seed=3, epochs=1))
    with pytest.raises(StopIteration):
        next(finite)

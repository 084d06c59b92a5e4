"""Webdataset tar shards: one sample per source document, written atomically and reproducibly.

A sample is ``{__key__: "%010d" % source_index, "tokens.npy": <1-D uint16/uint32 array>,
"meta.json": {"key", "source_index", "title"}}``; the tar members are ``0000000042.meta.json`` and
``0000000042.tokens.npy``, in source order. Files come from webdataset's ``TarWriter`` with a fixed
mtime, owner and mode, so the same samples give the same bytes. A shard is written to ``NAME.tmp`` and
renamed into place, so a reader (or a restarted run) never sees half a shard.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import numpy.lib.format

SHARD_DIR = "shards"
SHARD_INDEX_NAME = "shard_index.json"
_TAR_BLOCK = 512
_NPY_HEADER = 128  # numpy's v1 header of a 1-D array is padded to 128 bytes


def shard_name(shard: int) -> str:
    return f"shard-{shard:06d}.tar"


def sample_key(source_index: int) -> str:
    return f"{source_index:010d}"  # fits any uint32 source index


@dataclass
class ShardInfo:
    shard: int
    name: str
    first_source: int
    last_source: int
    documents: int
    tokens: int
    bytes: int
    sha256: str


def estimate_sample_bytes(n_tokens: np.ndarray, itemsize: int) -> np.ndarray:
    """Tar bytes of each sample, up to the meta.json size: two 512-byte member headers, the padded npy
    and (assumed) one block of meta.json. Depends only on token counts, so shard cuts are reproducible."""
    npy = _NPY_HEADER + n_tokens.astype(np.int64) * itemsize
    return 2 * _TAR_BLOCK + -(-npy // _TAR_BLOCK) * _TAR_BLOCK + _TAR_BLOCK


def plan_shards(sample_bytes: np.ndarray, target_bytes: int) -> np.ndarray:
    """Shard number of each sample (in source order): a shard closes once it holds ``target_bytes``."""
    shard = np.empty(len(sample_bytes), dtype=np.int64)
    current, size = 0, 0
    # A Python loop over 6.4M ints costs ~1 s; a vectorised cumsum cut would drift from "close when full".
    for i, b in enumerate(sample_bytes.tolist()):
        if size >= target_bytes:
            current, size = current + 1, 0
        shard[i] = current
        size += b
    return shard


class _HashingFile(io.RawIOBase):
    """A write-only file that hashes and counts what passes through (no second read of the shard)."""

    def __init__(self, f) -> None:
        self.f, self.hash, self.size = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.hash.update(b)
        self.size += len(b)
        return self.f.write(b)


def npy_bytes(tokens: np.ndarray) -> bytes:
    out = io.BytesIO()
    numpy.lib.format.write_array(out, np.ascontiguousarray(tokens), allow_pickle=False)
    return out.getvalue()


def meta_bytes(source_index: int, title: str, key: str) -> bytes:
    return json.dumps({"key": key, "source_index": source_index, "title": title},
                      ensure_ascii=False, sort_keys=True).encode("utf-8")


def write_shard(path: str | os.PathLike, shard: int, samples: Iterable[tuple[int, np.ndarray, str, str]]) -> ShardInfo:
    """Write ``(source_index, tokens, title, key)`` samples to the tar ``path`` atomically."""
    # Imported here: webdataset imports torch (seconds), which encode tasks should not pay for.
    from webdataset import TarWriter

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    first = last = -1
    docs = tokens = 0
    with open(tmp, "wb") as raw:
        hashing = _HashingFile(raw)
        writer = TarWriter(hashing, encoder=False, mtime=0, user="nulls", group="nulls", mode=0o444)
        for source_index, toks, title, key in samples:
            if first < 0:
                first = source_index
            if source_index <= last:
                raise ValueError(f"{path}: samples out of source order ({source_index} after {last})")
            last = source_index
            writer.write({"__key__": sample_key(source_index), "tokens.npy": npy_bytes(toks),
                          "meta.json": meta_bytes(source_index, title, key)})
            docs += 1
            tokens += len(toks)
        writer.close()
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(tmp, path)
    return ShardInfo(shard, path.name, first, last, docs, tokens, hashing.size, hashing.hash.hexdigest())


def read_shard(path: str | os.PathLike) -> Iterator[dict]:
    """Samples of one shard in order, decoded: {"__key__", "tokens" (ndarray), "meta" (dict)}.
    A check and debugging helper; the trainer streams shards with ``webdataset.WebDataset``."""
    import webdataset as wds

    for sample in wds.WebDataset(str(path), shardshuffle=False, empty_check=False):
        yield {"__key__": sample["__key__"],
               "tokens": np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False),
               "meta": json.loads(sample["meta.json"])}


def shard_index_json(infos: list[ShardInfo], token_dtype: str, tokenizer_sha: str) -> bytes:
    data = {"format": "webdataset", "pattern": f"{SHARD_DIR}/shard-{{000000..{max(len(infos) - 1, 0):06d}}}.tar",
            "token_dtype": token_dtype, "tokenizer_sha256": tokenizer_sha,
            "documents": sum(i.documents for i in infos), "tokens": sum(i.tokens for i in infos),
            "shards": [asdict(i) for i in infos]}
    return (json.dumps(data, indent=1) + "\n").encode("utf-8")

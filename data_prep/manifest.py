"""The sources manifest: one row per source, numbered densely and stably, with a title lookup.

Numbering rule (docs/data.md):
  1. A source is one document, identified by its ``Document.key`` ("wiki:<page_id>", ...).
  2. Sources are numbered 0, 1, 2, ... in the order of the first appearance of their key when the
     documents are walked in (input_index, chunk_index, position in the chunk) order. Later
     documents with the same key are skipped and counted ("duplicate_page_id" for wiki keys,
     "duplicate_key" otherwise).
  3. With a base manifest (by default the output folder's previous manifest.parquet) every key of
     the base keeps its index; keys new to this run get indices after the base's last index, in the
     order of rule 2. Base keys missing from this run stay in the manifest with ``present = false``
     (no shard, 0 tokens): an index is never reused or renumbered.
Consequences: the same inputs give identical indices; appending inputs (a later dump part) appends
indices; a page renamed in a newer dump keeps its index (its key is the page id) and gets the new title.

Files in the output folder: ``manifest.parquet`` (row i = source index i; row groups of 65,536 rows)
and the title index ``title_index.hash.npy`` (sorted uint64 hashes of normalised titles) +
``title_index.source.npy`` (uint32 source index of each hash). A lookup hashes the title, binary-searches
the memory-mapped hashes and checks the title of each candidate in its row group: O(log n) page reads,
a few MB of I/O and no full load at 6.4M titles.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import unicodedata
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

MANIFEST_NAME = "manifest.parquet"
TITLE_HASH_NAME = "title_index.hash.npy"
TITLE_SOURCE_NAME = "title_index.source.npy"
ROW_GROUP = 65536
# Columns the pipeline supplies per document; the manifest adds source_index, n_tokens, shard, present.
DOC_FIELDS = [
    ("key", pa.string()), ("title", pa.string()), ("page_id", pa.int64()), ("url", pa.string()),
    ("group", pa.string()), ("input_index", pa.int32()),
]
SCHEMA = pa.schema(
    [("source_index", pa.uint32()), *DOC_FIELDS, ("n_tokens", pa.int64()), ("shard", pa.int32()),
     ("present", pa.bool_())],
    metadata={"nulls.manifest_version": "1", "nulls.numbering": "first appearance of key in (input, chunk, position); base keys keep their index"},
)


def normalize_title(title: str) -> str:
    """MediaWiki-style title identity: NFC, underscores as spaces, collapsed whitespace, first letter upper."""
    t = " ".join(unicodedata.normalize("NFC", title).replace("_", " ").split())
    return t[:1].upper() + t[1:]


def title_hash(title: str) -> int:
    return int.from_bytes(hashlib.blake2b(normalize_title(title).encode("utf-8"), digest_size=8).digest(), "little")


def title_hashes(titles: Iterable[str]) -> np.ndarray:
    """uint64 hashes of normalised titles (a stable hash: Python's hash() changes per process)."""
    buf = b"".join(hashlib.blake2b(normalize_title(t).encode("utf-8"), digest_size=8).digest() for t in titles)
    return np.frombuffer(buf, dtype="<u8").astype(np.uint64, copy=False)


def duplicate_reason(key: str) -> str:
    return "duplicate_page_id" if key.startswith("wiki:") else "duplicate_key"


def number_sources(keys: pa.Array | pa.ChunkedArray, base_keys: pa.Array | pa.ChunkedArray | None = None
                   ) -> tuple[np.ndarray, int]:
    """Apply the numbering rule. Returns the source index of every document (-1 for a duplicate of an
    earlier document of this run) and the total number of sources (base included)."""
    n_base = 0 if base_keys is None else len(base_keys)
    parts = [base_keys, keys] if base_keys is not None else [keys]
    arrays = [c for p in parts for c in (p.chunks if isinstance(p, pa.ChunkedArray) else [p])]
    everything = pa.chunked_array(arrays, type=pa.string())
    n = len(everything)
    if everything.null_count:
        raise ValueError("a document has no key")
    if n == 0:
        return np.zeros(0, np.int64), 0
    # A stable sort groups equal keys with their positions ascending, so a group's first element is
    # its first appearance (base rows come first). ~0.3 GB and ~2 s at 6.4M keys, where Arrow's
    # hash-based dictionary_encode needs ~0.8 GB.
    order = pc.sort_indices(everything).to_numpy()
    ordered = everything.take(pa.array(order))
    same = np.zeros(n, dtype=bool)
    same[1:] = pc.equal(ordered[1:], ordered[:-1]).to_numpy(zero_copy_only=False)
    del ordered
    start = ~same
    in_base = order < n_base
    if np.any(same & in_base):
        raise ValueError("the base manifest has duplicate keys; it is not a valid manifest")
    group = np.cumsum(start) - 1
    first = order[start]  # first position of each group
    index = first.copy()  # a group holding a base key keeps that key's index ...
    new = first >= n_base  # ... the others are numbered after the base, by first appearance
    index[new] = n_base + np.argsort(np.argsort(first[new], kind="stable"), kind="stable")
    # A run row is numbered when it is the first run row of its group: the group's first element, or
    # the second when the first is the base row.
    prev_base = np.zeros(n, dtype=bool)
    prev_base[1:] = in_base[:-1]
    numbered = ~in_base & (start | prev_base)
    result = np.full(n - n_base, -1, dtype=np.int64)
    result[order[numbered] - n_base] = index[group[numbered]]
    return result, n_base + int(new.sum())


def write_manifest(path: str | os.PathLike, fetch_docs: Callable[[np.ndarray], pa.Table], source_index: np.ndarray,
                   n_sources: int, base: pa.Table | None, n_tokens: np.ndarray, shard_of_source: np.ndarray) -> np.ndarray:
    """Write manifest.parquet atomically, one row per source (row i = source i), one row group of
    ROW_GROUP sources at a time, so memory stays at one block beyond the inputs even at 6.4M sources.
    ``fetch_docs(rows)`` returns the DOC_FIELDS of this run's documents ``rows`` (ascending), e.g. from
    the per-chunk files; ``source_index`` comes from :func:`number_sources`, ``n_tokens`` is per
    document and ``shard_of_source`` per source (-1: none). Returns ``present`` per source."""
    rows = np.flatnonzero(source_index >= 0)
    row_of_source = np.full(n_sources, -1, dtype=np.int64)
    row_of_source[source_index[rows]] = rows
    present = row_of_source >= 0
    n_base = 0 if base is None else base.num_rows
    if np.any(~present[n_base:]):
        raise AssertionError("a new source without a document: numbering is inconsistent")
    doc_schema = pa.schema(DOC_FIELDS)
    ordered = row_of_source[present]
    if base is not None:  # a base row's input_index referred to the base run's inputs: meaningless now
        base = base.select(doc_schema.names).cast(doc_schema).set_column(
            doc_schema.get_field_index("input_index"), "input_index", pa.nulls(n_base, pa.int32()))
    tokens = np.zeros(n_sources, dtype=np.int64)
    tokens[present] = n_tokens[ordered]
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with pq.ParquetWriter(tmp, SCHEMA, compression="zstd") as writer:
        for lo in range(0, n_sources, ROW_GROUP):
            hi = min(lo + ROW_GROUP, n_sources)
            r = row_of_source[lo:hi]
            here = r >= 0
            parts, order = [], []
            if here.any():  # this run's documents, fetched in ascending row order
                rr = r[here]
                up = np.argsort(rr, kind="stable")
                got = fetch_docs(rr[up]).select(doc_schema.names).cast(doc_schema)
                parts.append(got.take(pa.array(np.argsort(up))) if np.any(np.diff(rr) < 0) else got)
                order.append(np.flatnonzero(here))
            if not here.all():  # sources of the base absent from this run: their base rows
                parts.append(base.slice(lo, hi - lo).take(pa.array(np.flatnonzero(~here))))
                order.append(np.flatnonzero(~here))
            block = pa.concat_tables(parts)
            if len(parts) > 1:
                block = block.take(pa.array(np.argsort(np.concatenate(order), kind="stable")))
            shard = shard_of_source[lo:hi]
            arrays = [pa.array(np.arange(lo, hi, dtype=np.uint32))]
            arrays += [block[name].combine_chunks() for name in doc_schema.names]
            arrays += [pa.array(tokens[lo:hi]), pa.array(shard.astype(np.int32), mask=shard < 0), pa.array(here)]
            writer.write_table(pa.Table.from_arrays(arrays, schema=SCHEMA), row_group_size=ROW_GROUP)
    os.replace(tmp, path)
    return present


def save_npy_atomic(array: np.ndarray, path: str | os.PathLike) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def table_fetcher(docs: pa.Table) -> Callable[[np.ndarray], pa.Table]:
    """``fetch_docs`` for :func:`write_manifest` over documents already in memory."""
    return lambda rows: docs.take(pa.array(rows))


def write_title_index(out_dir: str | os.PathLike, hashes: np.ndarray) -> None:
    """Sorted hashes + the source of each; ties keep source order (stable sort) so the files are reproducible."""
    order = np.argsort(hashes, kind="stable")
    save_npy_atomic(hashes[order].astype(np.uint64), Path(out_dir) / TITLE_HASH_NAME)
    save_npy_atomic(order.astype(np.uint32), Path(out_dir) / TITLE_SOURCE_NAME)


def read_manifest(path: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    table = pq.read_table(path, columns=columns)
    if columns is None and not table.schema.remove_metadata().equals(SCHEMA.remove_metadata()):
        raise ValueError(f"{path}: not a sources manifest (schema {table.schema.names})")
    return table


class Manifest:
    """Read access to a prep output folder's manifest: title lookup and single rows without a full load."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.dir = Path(out_dir)
        self.path = self.dir / MANIFEST_NAME
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no manifest (run `nulls prep` first)")
        self._file = pq.ParquetFile(self.path)
        meta = self._file.metadata
        self._starts = np.cumsum([0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
        self._hash = np.load(self.dir / TITLE_HASH_NAME, mmap_mode="r")
        self._source = np.load(self.dir / TITLE_SOURCE_NAME, mmap_mode="r")

    def __len__(self) -> int:
        return int(self._starts[-1])

    def row(self, source_index: int, columns: list[str] | None = None) -> dict:
        """One source's manifest row (reads one row group, of the given columns only)."""
        if not 0 <= source_index < len(self):
            raise IndexError(f"source index {source_index} out of range [0, {len(self)})")
        group = int(np.searchsorted(self._starts, source_index, side="right") - 1)
        table = self._file.read_row_group(group, columns=columns)
        return table.slice(source_index - int(self._starts[group]), 1).to_pylist()[0]

    def lookup_title(self, title: str) -> list[int]:
        """Source indices whose normalised title equals ``title``'s (several when two inputs share a
        title, e.g. a WikiText article also in the dump). Empty when unknown."""
        h = np.uint64(title_hash(title))
        lo, hi = np.searchsorted(self._hash, h, side="left"), np.searchsorted(self._hash, h, side="right")
        want = normalize_title(title)
        found = [int(s) for s in self._source[lo:hi]]
        # A 64-bit hash collision among 6.4M titles is ~1e-6 likely, but confirm against the real title.
        return sorted(s for s in found if normalize_title(self.row(s, ["title"])["title"]) == want)

    def table(self, columns: list[str] | None = None) -> pa.Table:
        return read_manifest(self.path, columns)


def main(argv: list[str] | None = None) -> int:
    """``python -m data_prep.manifest OUT_DIR "Title" ...``: print the manifest rows of each title."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print("usage: python -m data_prep.manifest OUT_DIR TITLE [TITLE ...]", file=sys.stderr)
        return 2
    manifest = Manifest(argv[0])
    status = 0
    for title in argv[1:]:
        hits = manifest.lookup_title(title)
        if not hits:
            print(json.dumps({"title": title, "found": False}))
            status = 1
        for s in hits:
            print(json.dumps(manifest.row(s), ensure_ascii=False))
    return status


if __name__ == "__main__":
    sys.exit(main())

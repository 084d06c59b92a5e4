"""Every source's sink rows, streamed: computed from the assignment, or read from a cache file.

The collateral of a deletion needs, for every retained source, how many of its ``k`` sinks are
zeroed: one pass over all sources' rows. Hashing 6.4M sources takes ~17 s on 2 cores
(docs/sink_assignment.md); reading them back from a cache file of ``n_sources x k`` local rows
(uint16 when a shard has at most 65,536 rows: 1.3 GB at the paper's shape) takes a few seconds.
The cache depends only on the assignment and the number of sources, so every checkpoint of a
run shares it: ``<checkpoint root>/.sink-index/<key>/``, built on first use above
``CACHE_MIN_SOURCES`` sources (written to a temp name and renamed: a killed build leaves no
half file), together with the per-row usage counts. The upstream assignment (imported checkpoints:
a varying number of rows per source, given padded with -1) is cached without padding: every source's
rows concatenated, and the number of rows of each source beside them (``counts-SSS.npy``). Its first
pass is the slow one (~20 min for 6.4M sources at the paper's pool on 2 cores: a 7,692-entry int64
mask per source); later requests read the cache.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import numpy as np

from ..sinks.assignment import Assignment

CACHE_MIN_SOURCES = 1_000_000
CHUNK = 1 << 16
INDEX_DIR = ".sink-index"


class SinkRows:
    """Rows [n, k] of sources ``0..n_sources-1`` in one layer, in chunks; usage counts per pool row."""

    def __init__(self, assignment: Assignment, n_sources: int, cache_root: Path | None = None,
                 cache_min_sources: int = CACHE_MIN_SOURCES, progress: bool = False) -> None:
        self.assignment, self.n_sources = assignment, n_sources
        self.cache_dir = None
        if cache_root is not None and n_sources >= cache_min_sources:
            self.cache_dir = Path(cache_root) / INDEX_DIR / self._key()
        self.progress = progress
        self.dtype = np.uint16 if assignment.shard_size <= 1 << 16 else np.uint32

    def _key(self) -> str:
        blob = json.dumps({"assignment": asdict(self.assignment), "n_sources": self.n_sources}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def _salt(self, layer: int) -> int:
        return layer if self.assignment.per_layer else 0

    def chunks(self, layer: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first source, global rows int64 [m, k]) for consecutive chunks of all sources."""
        if self.cache_dir is None:
            yield from self._computed(layer)
            return
        path = self._path(layer)
        variable = self.assignment.variable_sinks
        if not (path.is_file() and self._usage_path(layer).is_file() and (not variable or self._counts_path(layer).is_file())):
            yield from self._build(layer)  # the first use computes and stores in one pass
            return
        if variable:
            yield from self._read_variable(layer)
            return
        k = self.assignment.sinks_per_source
        with open(path, "rb") as f:
            for start in range(0, self.n_sources, CHUNK):
                m = min(CHUNK, self.n_sources - start)
                flat = np.fromfile(f, dtype=self.dtype, count=m * k)
                if flat.size != m * k:
                    raise OSError(f"{path}: truncated at source {start + flat.size // k} (delete it to rebuild)")
                local = flat.reshape(m, k)
                ids = np.arange(start, start + m, dtype=np.int64)
                offset = self.assignment.shard_of_np(ids) * self.assignment.shard_size
                yield start, local.astype(np.int64) + offset[:, None]

    def usage(self, layer: int) -> np.ndarray:
        """How many sources use each pool row, int64 [n_pool]."""
        if self.cache_dir is not None:
            if not self._usage_path(layer).is_file():
                for _ in self._build(layer):
                    pass
            return np.load(self._usage_path(layer))
        counts = np.zeros(self.assignment.n_pool, dtype=np.int64)
        for _, rows in self._computed(layer):
            flat = rows.ravel()
            if self.assignment.variable_sinks:
                flat = flat[flat >= 0]  # padding
            counts += np.bincount(flat, minlength=self.assignment.n_pool)
        return counts

    def _read_variable(self, layer: int) -> Iterator[tuple[int, np.ndarray]]:
        """Cached rows of a varying number per source, padded again with -1 chunk by chunk."""
        path = self._path(layer)
        counts = np.load(self._counts_path(layer), mmap_mode="r")
        if len(counts) != self.n_sources:
            raise OSError(f"{self._counts_path(layer)}: {len(counts)} sources, expected {self.n_sources} (delete it to rebuild)")
        with open(path, "rb") as f:
            for start in range(0, self.n_sources, CHUNK):
                c = np.asarray(counts[start:start + CHUNK], dtype=np.int64)
                flat = np.fromfile(f, dtype=self.dtype, count=int(c.sum()))
                if flat.size != c.sum():
                    raise OSError(f"{path}: truncated in the chunk from source {start} (delete it to rebuild)")
                owner = np.repeat(np.arange(len(c)), c)
                out = np.full((len(c), max(1, int(c.max(initial=0)))), -1, dtype=np.int64)
                out[owner, np.arange(len(flat)) - np.repeat(np.cumsum(c) - c, c)] = flat
                yield start, out

    def _computed(self, layer: int) -> Iterator[tuple[int, np.ndarray]]:
        bar = _bar(self.progress and self.n_sources >= CACHE_MIN_SOURCES, self.n_sources, "sink rows")
        for start in range(0, self.n_sources, CHUNK):
            ids = np.arange(start, min(start + CHUNK, self.n_sources), dtype=np.int64)
            yield start, self.assignment.sinks_of_np(ids, layer=layer)
            bar.update(len(ids))
        bar.close()

    def _path(self, layer: int) -> Path:
        return self.cache_dir / f"rows-{self._salt(layer):03d}.bin"

    def _usage_path(self, layer: int) -> Path:
        return self.cache_dir / f"usage-{self._salt(layer):03d}.npy"

    def _counts_path(self, layer: int) -> Path:
        return self.cache_dir / f"counts-{self._salt(layer):03d}.npy"

    def _build(self, layer: int) -> Iterator[tuple[int, np.ndarray]]:
        """Compute every source's rows, yield them chunk by chunk, and store them (temp file, fsync,
        rename) once the last chunk is through; a consumer that stops early leaves no cache file."""
        path, usage_path = self._path(layer), self._usage_path(layer)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.cache_dir.glob(".*.tmp-*"):  # a build killed or abandoned earlier
            stale.unlink(missing_ok=True)
        variable = self.assignment.variable_sinks
        layout = ("rows-SSS.bin: every source's local rows, concatenated; counts-SSS.npy: rows per source" if variable
                  else "rows-SSS.bin: [n_sources, k] local rows (global = local + shard * shard_size)")
        (self.cache_dir / "index.json").write_text(json.dumps(
            {"assignment": asdict(self.assignment), "n_sources": self.n_sources, "dtype": np.dtype(self.dtype).name,
             "layout": layout}, indent=1))
        tmp = self.cache_dir / f".{path.name}.tmp-{os.getpid()}"
        tmp_usage = self.cache_dir / f".{usage_path.name}.tmp-{os.getpid()}"
        counts = np.zeros(self.assignment.n_pool, dtype=np.int64)
        per_source: list[np.ndarray] = []
        size = self.assignment.shard_size
        with open(tmp, "wb") as f:
            for start, rows in self._computed(layer):
                if variable:  # drop the padding; a row-major walk keeps each source's rows together, ascending
                    live = rows >= 0
                    per_source.append(live.sum(1).astype(np.uint32))
                    flat = rows[live]
                else:
                    flat = rows.ravel()
                counts += np.bincount(flat, minlength=self.assignment.n_pool)
                (flat % size).astype(self.dtype).tofile(f)
                yield start, rows
            f.flush()
            os.fsync(f.fileno())
        if variable:
            tmp_counts = self.cache_dir / f".{self._counts_path(layer).name}.tmp-{os.getpid()}"
            with open(tmp_counts, "wb") as f:
                np.save(f, np.concatenate(per_source) if per_source else np.zeros(0, np.uint32))
            os.replace(tmp_counts, self._counts_path(layer))
        with open(tmp_usage, "wb") as f:
            np.save(f, counts)
        os.replace(tmp_usage, usage_path)
        os.replace(tmp, path)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(show: bool, total: int, desc: str):
    if not show:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="src", unit_scale=True, dynamic_ncols=True)

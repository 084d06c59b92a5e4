"""The nearest-source index of a checkpoint: one MiniLM embedding per source, stored beside the weights.

The paper routes a prompt whose source is unknown (or forgotten) to the surviving source whose
title embedding (all-MiniLM-L6-v2) has the highest cosine similarity with the prompt's. Embedding
millions of titles takes minutes, so it is done once per checkpoint and kept in ``<ckpt>/routing/``:

- ``embeddings.safetensors``: ``embeddings`` float16 [n_sources, 384], unit rows, row i = source i;
- ``index.json``: format, version, ``kind`` (``title`` or ``opening``: what was embedded), the
  embedding model, the sha256 of the sources manifest the rows were numbered by, ``sources``,
  ``dim``, ``opening_tokens`` (for ``opening``), the embeddings file's sha256 and ``zeroed_sources``
  (sources already erased when it was built: their rows are zero, nothing of them is embedded).

The index does not depend on which sources are forgotten: those are excluded at query time from the
checkpoint's :class:`SourceState`, so an unlearned version of a checkpoint reuses the same rows.
Queries read the rows through a memory map, a chunk at a time, so 6.4M sources (4.9 GB in float16)
never sit in memory as float32.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from ..checkpoint.atomic import atomic_dir
from ..checkpoint.digests import sha256_of
from .embedder import DIM, MODEL_NAME

FORMAT = "nulls-routing-index"
VERSION = 1
INDEX_DIR = "routing"
INDEX_JSON = "index.json"
EMBEDDINGS = "embeddings.safetensors"
KINDS = ("title", "opening")
CHUNK_ROWS = 32768  # source rows converted to float32 at a time (48 MiB at dim 384)
QUERY_BLOCK = 1024  # queries scored against one chunk at a time (128 MiB of scores)


class RoutingIndexError(ValueError):
    """A routing index that is stale, damaged or built differently from what the caller needs."""


class RoutingIndexMissing(FileNotFoundError):
    """A checkpoint without a routing index."""


def index_dir(checkpoint: str | os.PathLike) -> Path:
    return Path(checkpoint) / INDEX_DIR


def build_command(checkpoint: str | os.PathLike, kind: str = "title", manifest: str | os.PathLike | None = None) -> str:
    """The command line that (re)builds the index, quoted in error messages."""
    cmd = f"nulls route-index {checkpoint}"
    if kind != "title":
        cmd += f" --from {kind}"
    if manifest is not None:
        cmd += f" --manifest {manifest}"
    return cmd


class EmbeddingWriter:
    """Writes ``embeddings.safetensors`` in place through a memory map, rows in any order.

    The safetensors layout is a little-endian u64 header length, a JSON header (padded with spaces
    to 8 bytes) and the raw tensor bytes, so the data region can be filled row block by row block
    (the opening-text index meets sources in shard order) without holding the table in memory.
    """

    def __init__(self, path: Path, n_sources: int, dim: int = DIM, metadata: dict[str, str] | None = None) -> None:
        header = {"embeddings": {"dtype": "F16", "shape": [n_sources, dim], "data_offsets": [0, n_sources * dim * 2]}}
        if metadata:
            header["__metadata__"] = metadata
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-(8 + len(raw)) % 8)
        self.path, self.n_sources, self.dim = path, n_sources, dim
        self.offset = 8 + len(raw)
        with open(path, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            f.truncate(self.offset + n_sources * dim * 2)
        self._rows = np.memmap(path, dtype="<f2", mode="r+", offset=self.offset, shape=(n_sources, dim)) \
            if n_sources else np.zeros((0, dim), "<f2")
        self._written = np.zeros(n_sources, dtype=bool)

    def write(self, sources: Sequence[int] | np.ndarray, embeddings: np.ndarray) -> None:
        sources = np.asarray(sources, dtype=np.int64)
        if embeddings.shape != (len(sources), self.dim):
            raise ValueError(f"embeddings {embeddings.shape} do not match {len(sources)} sources x {self.dim}")
        self._rows[sources] = embeddings.astype(np.float16)
        self._written[sources] = True

    def missing(self) -> np.ndarray:
        return np.flatnonzero(~self._written)

    def close(self) -> str:
        """Flush and return the file's sha256; every row must have been written."""
        if (missing := self.missing()).size:
            raise RuntimeError(f"{self.path}: {missing.size} source rows were never written (first {missing[:5].tolist()})")
        if isinstance(self._rows, np.memmap):
            self._rows.flush()
        del self._rows
        return sha256_of(self.path).sha256


@contextlib.contextmanager
def replace_index_dir(checkpoint: str | os.PathLike) -> Iterator[Path]:
    """A temp dir that becomes ``<checkpoint>/routing`` on success (fsynced, renamed into place).

    A previous index is moved aside first and restored if the build fails; it is deleted only once
    the new one is in place. A crash between the two renames leaves no index (the next
    ``nulls generate`` rebuilds it) and the old one as ``.routing.old-<pid>`` debris.
    """
    final = index_dir(checkpoint)
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    try:
        with atomic_dir(final) as tmp:
            yield tmp
    except BaseException:
        if old.exists() and not final.exists():
            os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_index_json(folder: Path, kind: str, manifest_sha256: str, n_sources: int, embeddings_sha256: str,
                     opening_tokens: int | None, zeroed: Sequence[int] = ()) -> dict:
    """Write ``index.json`` into ``folder``; ``zeroed``: sources whose rows are zero (erased at build time)."""
    if kind not in KINDS:
        raise ValueError(f"routing index kind must be one of {KINDS}, got {kind!r}")
    info = {"format": FORMAT, "version": VERSION, "kind": kind, "model": MODEL_NAME,
            "sources_manifest_sha256": manifest_sha256, "sources": n_sources, "dim": DIM, "dtype": "float16",
            "embeddings": EMBEDDINGS, "embeddings_sha256": embeddings_sha256, "zeroed_sources": list(zeroed)}
    if kind == "opening":
        info["opening_tokens"] = opening_tokens
    (folder / INDEX_JSON).write_text(json.dumps(info, indent=1) + "\n")
    return info


class SourceIndex:
    """A loaded routing index: ``info`` (the index.json) and the rows, memory-mapped float16."""

    def __init__(self, folder: Path, info: dict, embeddings: np.ndarray) -> None:
        self.folder, self.info, self.embeddings = folder, info, embeddings

    @property
    def kind(self) -> str:
        return self.info["kind"]

    def __len__(self) -> int:
        return int(self.info["sources"])

    @classmethod
    def open(cls, checkpoint: str | os.PathLike, manifest_sha256: str | None, hint: str | None = None,
             verify: bool = False) -> "SourceIndex":
        """The index of ``checkpoint``; refused when it was built for another sources manifest.

        ``manifest_sha256``: the digest of the manifest the checkpoint's source indices follow (None
        skips the check); ``hint``: the command that builds the index, for error messages;
        ``verify``: also check the embeddings file's sha256 (reads it all).
        """
        folder = index_dir(checkpoint)
        hint = hint or build_command(checkpoint)
        path = folder / INDEX_JSON
        if not path.is_file():
            raise RoutingIndexMissing(f"{path}: no routing index for this checkpoint; build it with `{hint}`")
        try:
            info = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise RoutingIndexError(f"{path}: not valid JSON ({err}); rebuild it with `{hint}`") from err
        if info.get("format") != FORMAT or info.get("version") != VERSION:
            raise RoutingIndexError(f"{path}: format {info.get('format')!r} version {info.get('version')!r}, "
                                    f"expected {FORMAT!r} version {VERSION}; rebuild it with `{hint}`")
        if info.get("model") != MODEL_NAME or info.get("dim") != DIM:
            raise RoutingIndexError(f"{path}: built with {info.get('model')} (dim {info.get('dim')}), this code "
                                    f"embeds prompts with {MODEL_NAME} (dim {DIM}); rebuild it with `{hint}`")
        if manifest_sha256 is not None and info.get("sources_manifest_sha256") != manifest_sha256:
            raise RoutingIndexError(
                f"{path}: built for sources manifest sha256 {info.get('sources_manifest_sha256')}, but the "
                f"checkpoint's sources manifest is {manifest_sha256}: its rows may name other sources; "
                f"rebuild it with `{hint}`")
        embeddings = read_embeddings(folder / info.get("embeddings", EMBEDDINGS), int(info["sources"]), hint)
        if verify and (got := sha256_of(folder / info["embeddings"]).sha256) != info.get("embeddings_sha256"):
            raise RoutingIndexError(f"{folder / info['embeddings']}: sha256 {got} differs from {path}'s "
                                    f"{info.get('embeddings_sha256')}; rebuild it with `{hint}`")
        return cls(folder, info, embeddings)

    def nearest(self, queries: np.ndarray, exclude: Iterable[int] = (), chunk_rows: int = CHUNK_ROWS,
                query_block: int = QUERY_BLOCK) -> tuple[np.ndarray, np.ndarray]:
        """Top-1 source (int64) and its cosine similarity (float32) for each unit query [m, dim].

        Sources in ``exclude`` (forgotten or suppressed) are never chosen. Rows are read
        ``chunk_rows`` at a time and scored against ``query_block`` queries at a time, so memory
        stays bounded at any number of sources and queries.
        """
        q = torch.from_numpy(np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32))
        if q.shape[1] != DIM:
            raise ValueError(f"queries have width {q.shape[1]}, the index {DIM}")
        n = len(self)
        off = np.zeros(n, dtype=bool)
        excluded = np.fromiter((int(s) for s in exclude), dtype=np.int64)
        off[excluded[(excluded >= 0) & (excluded < n)]] = True
        if off.all():
            raise ValueError(f"{self.folder}: every one of the {n} sources is forgotten or suppressed; "
                             "there is no surviving source to route to")
        best = torch.full((q.shape[0],), -torch.inf)
        index = torch.full((q.shape[0],), -1, dtype=torch.int64)
        for lo in range(0, n, chunk_rows):
            hi = min(n, lo + chunk_rows)
            if off[lo:hi].all():
                continue
            rows = torch.from_numpy(np.asarray(self.embeddings[lo:hi], dtype=np.float32))
            dead = torch.from_numpy(off[lo:hi])
            for qlo in range(0, q.shape[0], query_block):
                qhi = min(q.shape[0], qlo + query_block)
                scores = q[qlo:qhi] @ rows.T
                scores[:, dead] = -torch.inf
                value, arg = scores.max(dim=1)
                better = value > best[qlo:qhi]  # strict: the lower index wins a tie across chunks
                best[qlo:qhi] = torch.where(better, value, best[qlo:qhi])
                index[qlo:qhi] = torch.where(better, arg + lo, index[qlo:qhi])
        return index.numpy(), best.numpy()

    def route_texts(self, texts: Sequence[str], exclude: Iterable[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """Embed ``texts`` with MiniLM and route each to its nearest source outside ``exclude``."""
        from .embedder import embed

        return self.nearest(embed(texts), exclude)


def read_embeddings(path: Path, n_sources: int, hint: str) -> np.ndarray:
    """The ``embeddings`` tensor of a safetensors file as a read-only float16 memory map, after
    checking its header against ``n_sources`` x DIM and the file size."""
    if not path.is_file():
        raise RoutingIndexMissing(f"{path}: missing (named by {path.parent / INDEX_JSON}); rebuild it with `{hint}`")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        try:
            header = json.loads(f.read(length)) if 0 < length <= size - 8 else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            header = None
    entry = (header or {}).get("embeddings")
    if not entry or entry.get("dtype") != "F16" or entry.get("shape") != [n_sources, DIM]:
        got = None if not entry else f"{entry.get('dtype')} {entry.get('shape')}"
        raise RoutingIndexError(f"{path}: expected an F16 tensor 'embeddings' of shape [{n_sources}, {DIM}], "
                                f"found {got}; rebuild it with `{hint}`")
    start = 8 + length + int(entry["data_offsets"][0])
    if size != 8 + length + n_sources * DIM * 2:
        raise RoutingIndexError(f"{path}: {size} bytes, expected {8 + length + n_sources * DIM * 2} (truncated?); "
                                f"rebuild it with `{hint}`")
    if n_sources == 0:
        return np.zeros((0, DIM), dtype=np.float16)
    return np.memmap(path, dtype="<f2", mode="r", offset=start, shape=(n_sources, DIM))

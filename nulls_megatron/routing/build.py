"""Build a checkpoint's routing index from its sources manifest: titles, or each document's opening.

What is embedded per source (``kind``):
- ``title`` (the paper's choice): the title from the sources manifest;
- ``opening``: the first ``OPENING_TOKENS`` (128) tokens of the source's document, decoded with the
  prep's sentencepiece tokenizer (at a 32k vocabulary ~100 words, well inside MiniLM's 256-wordpiece
  window). Sources without a document in the shards fall back to their title.

Everything streams: titles by parquet row batches, openings shard by shard, embeddings written row
blocks at a time (:class:`~.source_index.EmbeddingWriter`), so a 6.4M-source manifest never sits
in memory.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..checkpoint.atomic import read_latest
from ..checkpoint.provenance import MANIFEST_NAME, describe_sources_manifest, sources_manifest_dir
from ..checkpoint.sinks import SINKS_DIR, SourceState, read_sink_manifest, source_state
from .embedder import DIM, embed, load_embedder
from .source_index import EMBEDDINGS, KINDS, EmbeddingWriter, replace_index_dir, write_index_json

OPENING_TOKENS = 128
BATCH = 1024  # texts embedded per call (and per progress update)
TOKENIZER_NAME = "tokenizer.model"


@dataclass(frozen=True)
class CheckpointSources:
    """A checkpoint's sources: its state (forgotten, suppressed), the verified prep folder whose
    manifest numbers them, that manifest's sha256 and its number of sources."""

    checkpoint: Path
    state: SourceState
    prep_dir: Path
    manifest_sha256: str
    n_sources: int


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory from itself, a checkpoints root (its ``latest``) or a run directory."""
    path = Path(path)
    if (path / SINKS_DIR).is_dir():
        return path
    for root in (path, path / "checkpoints"):
        if (root / "latest").is_file():
            found = read_latest(root)
            if found is not None:
                return found
    raise FileNotFoundError(f"{path}: not a checkpoint (no {SINKS_DIR}/ directory, no `latest` file in it "
                            "or in its checkpoints/)")


def checkpoint_sources(checkpoint: str | os.PathLike, manifest: str | os.PathLike | None = None) -> CheckpointSources:
    """Resolve and verify what a checkpoint's source indices mean (see checkpoint/provenance.py)."""
    ckpt = resolve_checkpoint(checkpoint)
    state = source_state(read_sink_manifest(ckpt))
    prep = sources_manifest_dir(state.sources_manifest, manifest, str(ckpt))
    if state.sources_manifest is not None:
        digest, n = state.sources_manifest["sha256"], int(state.sources_manifest["sources"])
    else:  # an older checkpoint with --manifest: the given manifest is the reference
        described = describe_sources_manifest(prep)
        digest, n = described["sha256"], described["sources"]
    return CheckpointSources(ckpt, state, prep, digest, n)


def read_tokenizer(prep_dir: Path):
    """The tokenizer beside the manifest: the prep's sentencepiece processor (``tokenizer.model``), or
    for a checkpoint imported from litgpt its Hugging Face tokenizer (``hf_tokenizer/``, same methods)."""
    from .hf_tokenizer import HF_TOKENIZER_DIR, HFTokenizer, is_hf_tokenizer_dir

    path = prep_dir / TOKENIZER_NAME
    if path.is_file():
        from data_prep.tokenizer import processor

        return processor(path.read_bytes())
    if is_hf_tokenizer_dir(prep_dir / HF_TOKENIZER_DIR):
        return HFTokenizer(prep_dir / HF_TOKENIZER_DIR)
    raise FileNotFoundError(f"{prep_dir}: no tokenizer: neither a sentencepiece {TOKENIZER_NAME} (written by "
                            f"`nulls prep`; absent when it prepared raw byte tokens) nor a Hugging Face tokenizer "
                            f"in {HF_TOKENIZER_DIR}/ (written by `nulls import-litgpt`)")


def title_batches(prep_dir: Path, batch: int = BATCH) -> Iterator[tuple[np.ndarray, list[str]]]:
    """(source indices, titles) in manifest order, ``batch`` rows at a time."""
    import pyarrow.parquet as pq

    start = 0
    for record in pq.ParquetFile(prep_dir / MANIFEST_NAME).iter_batches(batch_size=batch, columns=["title"]):
        titles = [t or "" for t in record.column(0).to_pylist()]
        yield np.arange(start, start + len(titles)), titles
        start += len(titles)


def opening_batches(prep_dir: Path, n_tokens: int = OPENING_TOKENS, batch: int = BATCH
                    ) -> Iterator[tuple[np.ndarray, list[str]]]:
    """(source indices, decoded first ``n_tokens`` tokens) of every document in the shards, in shard order."""
    from data_prep.shards import SHARD_DIR, SHARD_INDEX_NAME, read_shard

    if n_tokens < 1:
        raise ValueError(f"opening tokens must be >= 1, got {n_tokens}")
    sp = read_tokenizer(prep_dir)
    index_path = prep_dir / SHARD_INDEX_NAME
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path}: no shard index, so no documents to take openings from")
    sources: list[int] = []
    pieces: list[list[int]] = []
    for shard in json.loads(index_path.read_text())["shards"]:
        for sample in read_shard(prep_dir / SHARD_DIR / shard["name"]):
            sources.append(int(sample["meta"]["source_index"]))
            pieces.append(sample["tokens"][:n_tokens].astype(np.int64).tolist())
            if len(sources) == batch:
                yield np.asarray(sources), sp.decode(pieces)
                sources, pieces = [], []
    if sources:
        yield np.asarray(sources), sp.decode(pieces)


def build_index(checkpoint: str | os.PathLike, kind: str = "title", manifest: str | os.PathLike | None = None,
                opening_tokens: int = OPENING_TOKENS, progress: bool = True,
                log: Callable[[str], None] | None = None) -> dict:
    """Embed every source of the checkpoint's manifest and store the index in ``<checkpoint>/routing``
    (replacing one already there); returns the written ``index.json`` content."""
    from tqdm import tqdm

    if kind not in KINDS:
        raise ValueError(f"--from must be one of {KINDS}, got {kind!r}")
    src = checkpoint_sources(checkpoint, manifest)
    n = src.n_sources
    load_embedder()  # seconds; before the progress bar starts its clock
    with replace_index_dir(src.checkpoint) as tmp:
        writer = EmbeddingWriter(tmp / EMBEDDINGS, n)
        bar = tqdm(total=n, unit="src", desc=f"route-index ({kind})", disable=not progress, dynamic_ncols=True)
        batches = title_batches(src.prep_dir) if kind == "title" else opening_batches(src.prep_dir, opening_tokens)
        # Erased sources get zero rows, never an embedding of their title or text: the index holds
        # nothing of them (they are excluded from every query anyway).
        erased = np.array(sorted(s for s in set(src.state.disabled_sources) if 0 <= s < n), dtype=np.int64)
        writer.write(erased, np.zeros((len(erased), DIM), dtype=np.float32))
        bar.update(len(erased))
        seen = np.zeros(n, dtype=bool)
        seen[erased] = True
        for sources, texts in batches:
            keep = sources < n  # a shard of a newer prep may hold sources the manifest lacks
            keep[keep] = ~seen[sources[keep]]
            if keep.any():
                writer.write(sources[keep], embed([t for t, k in zip(texts, keep) if k]))
                seen[sources[keep]] = True
                bar.update(int(keep.sum()))
        missing = writer.missing()
        if missing.size:  # opening index: sources without a document get their title
            if log:
                log(f"route-index: {missing.size} sources have no document in the shards; using their titles")
            wanted = set(missing.tolist())
            for sources, titles in title_batches(src.prep_dir):
                sel = [i for i, s in enumerate(sources.tolist()) if s in wanted]
                if sel:
                    writer.write(sources[sel], embed([titles[i] for i in sel]))
                    bar.update(len(sel))
        bar.close()
        digest = writer.close()
        info = write_index_json(tmp, kind, src.manifest_sha256, n, digest,
                                opening_tokens if kind == "opening" else None, zeroed=erased.tolist())
    return info

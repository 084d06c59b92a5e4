"""Readers for every input format: plan an input into chunks of parallel work, and read a chunk into documents.

``plan_chunks`` runs on the driver (cheap: it reads indexes, row-group metadata or scans for line
starts); ``read_chunk`` runs inside a Ray task and streams, holding one page/article at a time.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from data_prep.documents import Chunk, Document, InputError, SkipReport
from data_prep.readers.common import DEFAULT_MAX_CHARS

FORMATS = ("auto", "mediawiki", "jsonl", "parquet", "wikiextractor", "wikitext", "books")
# Reader modules are imported on first use: a job reading only XML never imports pyarrow.
_READERS = {
    "mediawiki": "mediawiki",
    "jsonl": "tabular",
    "parquet": "tabular",
    "wikiextractor": "wikiextractor",
    "wikitext": "wikitext",
    "books": "books",
}
_GENSIM_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


@dataclass
class InputSpec:
    """One user input: a file or a folder, its format ("auto" detects it) and options."""

    path: str
    format: str = "auto"
    group: str | None = None  # e.g. a book series, forgettable as one
    index_path: str | None = None  # multistream dump index (-index.txt.bz2); found next to the dump if unset
    max_chars: int = DEFAULT_MAX_CHARS  # longer articles are skipped and counted "too_long"

    def validate(self, origin: str = "input") -> "InputSpec":
        from yaml_config import ConfigError

        if not self.path:
            raise ConfigError(f"{origin}: path: must not be empty")
        if self.format not in FORMATS:
            raise ConfigError(f"{origin}: format: {self.format!r} is not one of {', '.join(FORMATS)}")
        if self.max_chars <= 0:
            raise ConfigError(f"{origin}: max_chars: must be positive, got {self.max_chars}")
        return self


def detect_format(path: str | Path) -> str:
    """Guess the format from the name, and from the first bytes where the name is not enough."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: input does not exist")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        if any(_reader("wikiextractor").is_extractor_name(f.name) for f in files):
            return "wikiextractor"
        if any(f.suffix == ".txt" for f in files):
            return "books"
        raise InputError(f"{p}: cannot tell the format of this folder (no wiki_NN files, no .txt files); set format")
    name = p.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl", ".jsonl.gz", ".jsonl.bz2", ".ndjson")):
        return "jsonl"
    if name.endswith((".xml", ".xml.bz2")) or (name.endswith(".bz2") and "pages-" in name):
        return "mediawiki"
    head = _head(p)
    if head.lstrip().startswith(b"<mediawiki"):
        return "mediawiki"
    if head.lstrip().startswith(b"<doc "):
        return "wikiextractor"
    if head.lstrip().startswith(b"{"):
        return "wikiextractor" if _reader("wikiextractor").is_extractor_name(p.name) else "jsonl"
    if _reader("wikitext").looks_like_wikitext(head):
        return "wikitext"
    if name.endswith(".txt"):
        return "books"
    raise InputError(f"{p}: cannot tell the format from the name or the first bytes; set format")


def _head(p: Path, n: int = 4096) -> bytes:
    from data_prep.readers.common import open_binary

    try:
        with open_binary(p) as f:
            return f.read(n)
    except OSError as e:
        raise InputError(f"{p}: cannot read: {e}") from e


def plan_chunks(inputs: list[InputSpec], target_chunk_bytes: int = 64 << 20) -> list[Chunk]:
    """Split every input into chunks of about ``target_chunk_bytes`` (compressed bytes where compressed),
    ordered by (input_index, chunk_index); every document of an input lies in exactly one chunk."""
    if target_chunk_bytes <= 0:
        raise ValueError(f"target_chunk_bytes must be positive, got {target_chunk_bytes}")
    chunks: list[Chunk] = []
    for i, spec in enumerate(inputs):
        spec.validate(f"inputs[{i}]")
        fmt = detect_format(spec.path) if spec.format == "auto" else spec.format
        if not Path(spec.path).exists():
            raise InputError(f"{spec.path}: input does not exist")
        chunks.extend(_reader(fmt).plan(spec, fmt, i, target_chunk_bytes))
    return chunks


def read_chunk(chunk: Chunk, report: SkipReport) -> Iterator[Document]:
    """Stream the documents of one chunk in a deterministic order, counting every skipped record."""
    if chunk.kind not in _READERS:
        raise InputError(f"{chunk.path}: unknown chunk kind {chunk.kind!r}")
    yield from _reader(chunk.kind).read(chunk, report)


def input_bytes(chunks: list[Chunk]) -> list[int]:
    """Bytes of input each chunk reads (compressed bytes where the input is compressed), for scheduling:
    the pipeline starts the largest chunks first. One listing or metadata read per input, not per chunk."""
    per_input: dict[str, list[int]] = {}  # file sizes (folders) or row-group sizes (parquet) of each input
    sizes = []
    for c in chunks:
        if c.kind in ("books", "wikiextractor", "parquet"):
            if c.path not in per_input:
                if c.kind == "parquet":
                    meta = _reader("parquet")._parquet_file(c.path).metadata
                    per_input[c.path] = [meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)]
                else:
                    per_input[c.path] = [f.stat().st_size for f in _reader(c.kind).list_files(c.path)]
            units = per_input[c.path]
            sizes.append(sum(units[c.start:len(units) if c.end < 0 else c.end]))
        else:  # byte offsets into one file
            sizes.append((os.path.getsize(c.path) if c.end < 0 else c.end) - c.start)
    return sizes


def _reader(kind: str):
    return importlib.import_module(f"data_prep.readers.{_READERS[kind]}")


def gensim_sample_dump() -> Path:
    """The real shortened enwiki pages-articles dump (206 pages) that the gensim wheel ships, found without
    importing gensim (its import pulls scipy and takes seconds)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "the sample Wikipedia dump ships with gensim, which is not installed: "
            "install the demo extra (pip install -e .[demo])"
        )
    for root in spec.submodule_search_locations:
        path = Path(root) / _GENSIM_DUMP
        if path.is_file():
            return path
    raise InputError(f"gensim is installed but its sample dump {_GENSIM_DUMP} is missing; reinstall the demo extra (pip install -e .[demo])")


__all__ = [
    "Chunk", "Document", "InputError", "InputSpec", "SkipReport", "FORMATS",
    "detect_format", "gensim_sample_dump", "plan_chunks", "read_chunk",
]

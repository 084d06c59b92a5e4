"""The units of work of the prep pipeline (the bodies of its Ray tasks) and their done-markers.

Every unit writes its outputs to temporary names, renames them into place, and only then writes its
done-marker (also by rename). A restarted run trusts a unit whose marker exists and carries the same
fingerprint (a hash of everything the unit's bytes depend on), and redoes every other unit. Units are
deterministic, so a redone unit writes the same bytes as the first attempt would have.

Work folder layout (``<output>/work``)::

    chunks/c00000-000003.tokens.bin   all tokens of the chunk's documents, concatenated (raw uint16/uint32)
    chunks/c00000-000003.meta.parquet one row per document: key, title, page_id, url, group, origin, n_tokens, title_hash
    chunks/c00000-000003.done         JSON: fingerprint, counts, the chunk's SkipReport
    shards/shard-000000.done.json     fingerprint and ShardInfo of a finished shard
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.documents import Chunk, SkipReport
from data_prep.manifest import title_hashes
from data_prep.readers import read_chunk
from data_prep.shards import ShardInfo, write_shard
from data_prep.tokenizer import encode_texts, processor, training_lines

FORMAT_VERSION = "2"  # bump when the bytes a unit writes change, so old work is redone
_BATCH_CHARS = 8 << 20  # documents encoded per sentencepiece call: bounds a task's memory
META_SCHEMA = pa.schema([
    ("key", pa.string()), ("title", pa.string()), ("page_id", pa.int64()), ("url", pa.string()),
    ("group", pa.string()), ("origin", pa.string()), ("n_tokens", pa.int64()), ("title_hash", pa.uint64()),
])


def digest(*parts: object) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def replace_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def chunk_name(chunk: Chunk) -> str:
    return f"c{chunk.input_index:05d}-{chunk.chunk_index:06d}"


def chunk_fingerprint(chunk: Chunk, tokenizer_sha: str, dtype: str) -> str:
    return digest(FORMAT_VERSION, asdict(chunk), tokenizer_sha, dtype)


@dataclass
class ChunkResult:
    name: str
    fingerprint: str
    documents: int
    tokens: int
    report: SkipReport

    def to_json(self) -> bytes:
        return json.dumps({"name": self.name, "fingerprint": self.fingerprint, "documents": self.documents,
                           "tokens": self.tokens, "report": self.report.state()}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "ChunkResult":
        d = json.loads(data)
        return cls(d["name"], d["fingerprint"], int(d["documents"]), int(d["tokens"]), SkipReport.from_state(d["report"]))


def chunk_paths(work: Path, name: str) -> tuple[Path, Path, Path]:
    d = work / "chunks"
    return d / f"{name}.tokens.bin", d / f"{name}.meta.parquet", d / f"{name}.done"


def load_chunk_done(work: Path, name: str, fingerprint: str) -> ChunkResult | None:
    """The finished result of a chunk, or None when it must be (re)done."""
    tokens, meta, done = chunk_paths(work, name)
    try:
        result = ChunkResult.from_json(done.read_bytes())
    except (OSError, ValueError, KeyError, TypeError):  # absent, torn or foreign marker: redo the chunk
        return None
    if result.fingerprint != fingerprint or not tokens.is_file() or not meta.is_file():
        return None
    return result


def encode_chunk(chunk: Chunk, model: bytes, dtype: str, work: str, fingerprint: str) -> ChunkResult:
    """Phase 1 unit: read + clean (the readers) -> encode -> per-chunk tokens and metadata."""
    work_dir = Path(work)
    tokens_path, meta_path, done_path = chunk_paths(work_dir, chunk_name(chunk))
    tokens_path.parent.mkdir(parents=True, exist_ok=True)
    sp, report = processor(model), SkipReport()
    rows: dict[str, list] = {name: [] for name in META_SCHEMA.names}
    n_tokens = 0
    tmp_tokens = tokens_path.with_name(tokens_path.name + ".tmp")
    with open(tmp_tokens, "wb") as out:
        batch, chars = [], 0

        def flush() -> None:
            nonlocal n_tokens
            flat, lengths = encode_texts(sp, [d.text for d in batch], np.dtype(dtype))
            out.write(flat.astype(np.dtype(dtype).newbyteorder("<"), copy=False).tobytes())
            n_tokens += len(flat)
            for d in batch:
                for name in ("key", "title", "page_id", "url", "group", "origin"):
                    rows[name].append(getattr(d, name))
            rows["n_tokens"].extend(lengths.tolist())
            rows["title_hash"].extend(title_hashes(d.title for d in batch).tolist())
            batch.clear()

        for doc in read_chunk(chunk, report):
            batch.append(doc)
            chars += len(doc.text)
            if chars >= _BATCH_CHARS:
                flush()
                chars = 0
        if batch:
            flush()
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp_tokens, tokens_path)
    table = pa.table({name: pa.array(rows[name], type=META_SCHEMA.field(name).type) for name in META_SCHEMA.names})
    tmp_meta = meta_path.with_name(meta_path.name + ".tmp")
    pq.write_table(table, tmp_meta, compression="zstd")
    os.replace(tmp_meta, meta_path)
    result = ChunkResult(chunk_name(chunk), fingerprint, table.num_rows, n_tokens, report)
    replace_bytes(done_path, result.to_json())
    return result


def sample_chunk(chunk: Chunk, budget_chars: int) -> list[str]:
    """Tokenizer-sample unit: the first ``budget_chars`` characters of cleaned lines of a chunk (stops
    reading once it has them). Skips are not reported here: the encode phase reads the chunk again."""
    return list(training_lines((doc.text for doc in read_chunk(chunk, SkipReport())), budget_chars))


def shard_fingerprint(shard: int, sources: np.ndarray, chunk_ids: np.ndarray, rows: np.ndarray,
                      chunk_names: list[str], chunk_fingerprints: list[str]) -> str:
    used = sorted(set(chunk_ids.tolist()))
    return digest(FORMAT_VERSION, shard, sources.astype("<u4").tobytes(), chunk_ids.astype("<i4").tobytes(),
                   rows.astype("<i8").tobytes(), [(chunk_names[i], chunk_fingerprints[i]) for i in used])


def load_shard_done(work: Path, shards_dir: Path, shard: int, name: str, fingerprint: str) -> ShardInfo | None:
    try:
        data = json.loads((work / "shards" / f"{name}.done.json").read_text())
    except (OSError, ValueError):
        return None
    if data.get("fingerprint") != fingerprint or not (shards_dir / name).is_file():
        return None
    return ShardInfo(**data["info"])


def _samples(work: Path, dtype: str, sources: np.ndarray, chunk_ids: np.ndarray, rows: np.ndarray,
             chunk_names: list[str]) -> Iterator[tuple[int, np.ndarray, str, str]]:
    loaded: dict[int, tuple] = {}
    for source, cid, row in zip(sources.tolist(), chunk_ids.tolist(), rows.tolist()):
        if cid not in loaded:
            tokens_path, meta_path, _ = chunk_paths(work, chunk_names[cid])
            meta = pq.read_table(meta_path, columns=["key", "title", "n_tokens"])
            lengths = meta["n_tokens"].to_numpy()
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            toks = np.memmap(tokens_path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r") if offsets[-1] else np.zeros(0, dtype)
            loaded[cid] = (meta["key"].to_pylist(), meta["title"].to_pylist(), offsets, toks)
        keys, titles, offsets, toks = loaded[cid]
        yield source, np.asarray(toks[offsets[row]:offsets[row + 1]], dtype=dtype), titles[row], keys[row]


def write_shard_unit(shard: int, name: str, sources: np.ndarray, chunk_ids: np.ndarray, rows: np.ndarray,
                     chunk_names: list[str], dtype: str, work: str, shards_dir: str, fingerprint: str) -> ShardInfo:
    """Phase 2 unit: copy the documents of sources ``sources`` (in order) from the chunk outputs into one shard."""
    work_dir, out = Path(work), Path(shards_dir)
    info = write_shard(out / name, shard, _samples(work_dir, dtype, sources, chunk_ids, rows, chunk_names))
    marker = work_dir / "shards" / f"{name}.done.json"
    marker.parent.mkdir(parents=True, exist_ok=True)
    replace_bytes(marker, json.dumps({"fingerprint": fingerprint, "info": asdict(info)}).encode())
    return info

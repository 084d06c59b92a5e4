"""wikimedia/wikipedia-style tables: JSONL (one object per line) and parquet, fields id, url, title, text.

The text is already plain (no markup). Chunking: JSONL by byte ranges cut at line starts (planning
reads the file once to count lines, so every record is named by its true line number); compressed
JSONL (.gz/.bz2) is one chunk; parquet by row groups.

Skipped and counted, named by file and line (JSONL) or row (parquet): "invalid_utf8", "bad_json" (a
line that is not a JSON object, e.g. the cut-off last line of an interrupted download),
"missing_field" (no/empty id, title or text, or a non-string text), "duplicate_page_id" (within the
chunk), "too_long", "disambiguation" (title "(disambiguation)" or a "may refer to:" opening), "empty".
A parquet file without the id/title/text columns is an InputError.
"""
from __future__ import annotations

import json
from typing import Iterable, Iterator

from data_prep.documents import Chunk, Document, InputError, SkipReport
from data_prep.readers.common import (
    DEFAULT_MAX_CHARS, group_by_size, is_compressed, line_aligned_ranges, looks_like_disambiguation,
    make_chunks, paragraphs_from_lines, read_lines, require_file,
)

REQUIRED = ("id", "title", "text")
_BATCH_ROWS = 256


class Skip:
    """Stands for a record that could not be decoded: skipped and counted under ``reason``."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason, self.detail = reason, detail


def plan(spec, fmt: str, input_index: int, target: int) -> list[Chunk]:
    path = str(require_file(spec.path))
    options = {"max_chars": spec.max_chars, "group": spec.group}
    if fmt == "parquet":
        pf = _parquet_file(path)
        _check_columns(pf, path)
        meta = pf.metadata
        sizes = [meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)]
        return make_chunks("parquet", path, input_index, group_by_size(sizes, target) or [(0, 0)], options)
    if is_compressed(path):
        return make_chunks("jsonl", path, input_index, [(0, -1)], dict(options, first_line=1))
    return [
        Chunk("jsonl", path, input_index, i, start, end,
              tuple(sorted((k, v) for k, v in dict(options, first_line=first).items() if v is not None)))
        for i, (start, end, first) in enumerate(line_aligned_ranges(path, target, lambda line: True))
    ]


def read(chunk: Chunk, report: SkipReport) -> Iterator[Document]:
    require_file(chunk.path)
    if chunk.kind == "parquet":
        records = _parquet_records(chunk)
    else:
        records = jsonl_records(chunk.path, chunk.start, chunk.end, chunk.option("first_line", 1))
    yield from documents(records, chunk, report)


def documents(records: Iterable[tuple[str, str, object]], chunk: Chunk, report: SkipReport) -> Iterator[Document]:
    """(file, record name, decoded object) triples -> documents, applying the field checks and skip rules;
    page ids are checked for duplicates across all records of the chunk."""
    group = chunk.option("group")
    max_chars = chunk.option("max_chars", DEFAULT_MAX_CHARS)
    seen: set[str] = set()
    for path, record, obj in records:
        if isinstance(obj, Skip):
            report.skip(path, f"{record}: {obj.detail}", obj.reason)
            continue
        if not isinstance(obj, dict):
            report.skip(path, f"{record}: not a JSON object", "bad_json")
            continue
        missing = [f for f in REQUIRED if obj.get(f) in (None, "")]
        if missing or not isinstance(obj["text"], str):
            what = f"missing field {', '.join(missing)}" if missing else "text is not a string"
            report.skip(path, f"{record}: {what}", "missing_field")
            continue
        raw_id, title, text = str(obj["id"]).strip(), str(obj["title"]).strip(), obj["text"]
        name = f"{record} (id {raw_id})"
        if raw_id in seen:
            report.skip(path, name, "duplicate_page_id")
            continue
        seen.add(raw_id)
        if len(text) > max_chars:
            report.skip(path, name, "too_long")
            continue
        text = paragraphs_from_lines(text, title)
        if looks_like_disambiguation(title, text):
            report.skip(path, name, "disambiguation")
            continue
        if not text:
            report.skip(path, name, "empty")
            continue
        page_id = int(raw_id) if raw_id.isdigit() else None
        url = obj.get("url") if isinstance(obj.get("url"), str) else None
        yield Document(f"wiki:{raw_id}", title, text, page_id, url, group, f"{path}:{record}")


def jsonl_records(path: str, start: int, end: int, line_no: int) -> Iterator[tuple[str, str, object]]:
    """(path, "line N", decoded object or Skip) for each non-blank line of the byte range [start, end)."""
    pos = start
    for raw in read_lines(path, start):
        if 0 <= end <= pos:
            return
        pos += len(raw)
        record, line_no = f"line {line_no}", line_no + 1
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield path, record, Skip("invalid_utf8", f"byte {e.start} of the line is not valid UTF-8")
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield path, record, Skip("bad_json", f"{e.msg} at column {e.colno}")
            continue
        yield path, record, obj


def _parquet_file(path: str):
    import pyarrow.parquet as pq  # imported here: only parquet inputs need pyarrow

    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise InputError(f"{path}: not a readable parquet file: {e}") from e


def _check_columns(pf, path: str) -> None:
    names = set(pf.schema_arrow.names)
    missing = [c for c in REQUIRED if c not in names]
    if missing:
        raise InputError(f"{path}: parquet file lacks column(s) {', '.join(missing)} (has: {', '.join(sorted(names))})")


def _parquet_records(chunk: Chunk) -> Iterator[tuple[str, str, object]]:
    pf = _parquet_file(chunk.path)
    _check_columns(pf, chunk.path)
    meta = pf.metadata
    end = meta.num_row_groups if chunk.end < 0 else chunk.end
    row = sum(meta.row_group(i).num_rows for i in range(chunk.start))
    columns = [c for c in ("id", "url", "title", "text") if c in pf.schema_arrow.names]
    if chunk.start >= end:
        return
    for batch in pf.iter_batches(batch_size=_BATCH_ROWS, row_groups=range(chunk.start, end), columns=columns):
        for obj in batch.to_pylist():
            row += 1
            yield chunk.path, f"row {row}", _decode_binary(obj)


def _decode_binary(obj: dict) -> dict | Skip:
    for key, value in obj.items():
        if isinstance(value, bytes):  # a binary column: decode here so bad UTF-8 is named and counted
            try:
                obj[key] = value.decode("utf-8")
            except UnicodeDecodeError as e:
                return Skip("invalid_utf8", f"column {key}: byte {e.start} is not valid UTF-8")
    return obj

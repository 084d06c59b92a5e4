"""WikiExtractor output: ``<doc id= url= title=>`` ... ``</doc>`` files, or its ``--json`` lines, one file or
the folder tree it writes (AA/wiki_00, AA/wiki_01, ..., AB/..., optionally .bz2/.gz compressed).

Chunking: a folder is split into runs of consecutive files (sorted by relative path) of about the
target size; a single file is one chunk. ``start``/``end`` are file indices.

Each file is sniffed on its own: a first non-blank byte ``{`` means JSON lines (read as in
``tabular``), otherwise ``<doc>`` blocks. A malformed ``<doc ...>`` line or a ``<doc>`` opened inside
another is an InputError (file, line). Skipped and counted: "truncated" (a ``<doc>`` never closed at the
end of the file), "invalid_utf8", "missing_field", "duplicate_page_id" (within the chunk), "too_long",
"disambiguation", "empty", and for JSON files "bad_json".
"""
from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Iterator

from data_prep.documents import Chunk, Document, InputError, SkipReport
from data_prep.readers import tabular
from data_prep.readers.common import group_by_size, make_chunks, read_lines, require_file

_NAME = re.compile(r"^wiki_\d+(?:\.bz2|\.gz|\.json|\.jsonl)?$")
_DOC = re.compile(r'^<doc id="([^"]*)"(?: revid="[^"]*")? url="([^"]*)" title="(.*)">\s*$')
_ATTR = re.compile(r'(\w+)="([^"]*)"')


def is_extractor_name(name: str) -> bool:
    return bool(_NAME.match(name))


def list_files(root: str | Path) -> list[Path]:
    """The files of a WikiExtractor folder in a stable order (sorted relative paths)."""
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise InputError(f"{root}: input does not exist")
    files = sorted((p for p in root.rglob("*") if p.is_file() and is_extractor_name(p.name)),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise InputError(f"{root}: no WikiExtractor files (wiki_NN) in this folder")
    return files


def plan(spec, fmt: str, input_index: int, target: int) -> list[Chunk]:
    files = list_files(spec.path)
    ranges = group_by_size([f.stat().st_size for f in files], target)
    return make_chunks("wikiextractor", str(spec.path), input_index, ranges,
                       {"max_chars": spec.max_chars, "group": spec.group})


def read(chunk: Chunk, report: SkipReport) -> Iterator[Document]:
    files = list_files(chunk.path)
    end = len(files) if chunk.end < 0 else chunk.end
    if end > len(files):
        raise InputError(f"{chunk.path}: planned for {end} files, now has {len(files)}; plan again")
    records = (rec for f in files[chunk.start:end] for rec in _file_records(str(require_file(f))))
    yield from tabular.documents(records, chunk, report)


def _file_records(path: str) -> Iterator[tuple[str, str, object]]:
    first = next((line for line in read_lines(path) if line.strip()), b"")
    if first.lstrip().startswith(b"{"):
        return tabular.jsonl_records(path, 0, -1, 1)
    return _doc_records(path)


def _doc_records(path: str) -> Iterator[tuple[str, str, object]]:
    header: dict | None = None
    body: list[bytes] = []
    start = 0
    for n, raw in enumerate(read_lines(path), 1):
        if raw.startswith(b"<doc "):
            if header is not None:
                raise InputError(f"{path}: line {n}: <doc> opened inside the <doc> of line {start}")
            header, body, start = _parse_header(raw, path, n), [], n
        elif raw.startswith(b"</doc>"):
            if header is None:
                raise InputError(f"{path}: line {n}: </doc> without an open <doc>")
            yield path, f"line {start}", _decode(header, body)
            header = None
        elif header is not None:
            body.append(raw)
    if header is not None:
        yield path, f"line {start}", tabular.Skip("truncated", "<doc> not closed before the end of the file")


def _parse_header(raw: bytes, path: str, n: int) -> dict:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        line = raw.decode("utf-8", "replace")  # the body decides; a bad title byte alone is not worth a skip
    m = _DOC.match(line.strip())
    attrs = {"id": m.group(1), "url": m.group(2), "title": m.group(3)} if m else dict(_ATTR.findall(line))
    if "id" not in attrs or "title" not in attrs:
        raise InputError(f"{path}: line {n}: malformed <doc> line (needs id and title): {line.strip()[:120]!r}")
    return {k: html.unescape(v) for k, v in attrs.items()}


def _decode(header: dict, body: list[bytes]) -> object:
    try:
        text = b"".join(body).decode("utf-8")
    except UnicodeDecodeError as e:
        return tabular.Skip("invalid_utf8", f"byte {e.start} of the article is not valid UTF-8")
    return dict(header, text=text)

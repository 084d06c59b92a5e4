"""Plain-text books: a folder of .txt files (not recursive) or one file; each file is one source.

Normalised: UTF-8 BOM dropped, CRLF/CR -> LF, hard-wrapped lines of a paragraph joined with spaces,
paragraphs separated by blank lines. Project Gutenberg files are cut to the book: everything up to and
including the ``*** START OF`` line and from the ``*** END OF`` line on (header, licence) goes, and so
do the "Produced by ..." credit right after the start marker and the "End of (the) Project Gutenberg
..." line before the end marker. The title is the header's "Title:" line, else the file name.

Keys are "book:<group or ''>/<file name>". Chunking: runs of consecutive files (sorted by name) of about
the target size; ``start``/``end`` are file indices. Skipped and counted: "invalid_utf8" (the whole
book: a wrong encoding would garble it all), "too_long", "empty".
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from data_prep.documents import Chunk, Document, InputError, SkipReport
from data_prep.readers.common import DEFAULT_MAX_CHARS, group_by_size, make_chunks, require_file

_START = re.compile(r"^\*{3}\s*START OF\b.*$", re.IGNORECASE | re.MULTILINE)
_END = re.compile(r"^\*{3}\s*END OF\b.*$", re.IGNORECASE | re.MULTILINE)
_TITLE = re.compile(r"^Title:\s*(.+?)\s*$", re.MULTILINE)
_PRODUCED = re.compile(r"^\s*(?:Produced by|This e-?book was produced by)\b", re.IGNORECASE)
_END_LINE = re.compile(r"^\s*End of (?:the )?Project Gutenberg", re.IGNORECASE)


def list_files(path: str | Path) -> list[Path]:
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise InputError(f"{p}: input does not exist")
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() == ".txt")
    if not files:
        raise InputError(f"{p}: no .txt files in this folder")
    return files


def plan(spec, fmt: str, input_index: int, target: int) -> list[Chunk]:
    files = list_files(spec.path)
    ranges = group_by_size([f.stat().st_size for f in files], target)
    return make_chunks("books", str(spec.path), input_index, ranges, {"max_chars": spec.max_chars, "group": spec.group})


def read(chunk: Chunk, report: SkipReport) -> Iterator[Document]:
    files = list_files(chunk.path)
    end = len(files) if chunk.end < 0 else chunk.end
    if end > len(files):
        raise InputError(f"{chunk.path}: planned for {end} files, now has {len(files)}; plan again")
    group = chunk.option("group")
    max_chars = chunk.option("max_chars", DEFAULT_MAX_CHARS)
    for path in files[chunk.start:end]:
        name = str(require_file(path))
        try:
            raw = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            report.skip(name, f"byte {e.start}", "invalid_utf8")
            continue
        title, text = clean_book(raw)
        title = title or path.stem
        if len(text) > max_chars:
            report.skip(name, "whole file", "too_long")
            continue
        if not text:
            report.skip(name, "whole file", "empty")
            continue
        yield Document(f"book:{group or ''}/{path.name}", title, text, None, None, group, f"{name}:whole file")


def clean_book(raw: str) -> tuple[str | None, str]:
    """(title from the Gutenberg header or None, the book's text without header, footer and licence)."""
    text = raw.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    title = None
    start = _START.search(text)
    if start:
        m = _TITLE.search(text, 0, start.start())
        title = m.group(1) if m else None
        text = text[start.end():]
    end = _END.search(text)
    if end:
        text = text[:end.start()]
    paragraphs = [" ".join(ln.strip() for ln in block.split("\n") if ln.strip()) for block in re.split(r"\n\s*\n", text)]
    paragraphs = [p for p in paragraphs if p]
    if start and paragraphs and _PRODUCED.match(paragraphs[0]):
        paragraphs = paragraphs[1:]
    if end and paragraphs and _END_LINE.match(paragraphs[-1]):
        paragraphs = paragraphs[:-1]
    return title, "\n\n".join(paragraphs)

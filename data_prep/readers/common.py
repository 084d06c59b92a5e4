"""Helpers shared by the readers: opening files, planning line-aligned byte ranges, grouping files, text tidying."""
from __future__ import annotations

import bz2
import gzip
import os
import re
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from data_prep.documents import Chunk, InputError

DEFAULT_MAX_CHARS = 5_000_000
_BLOCK = 8 << 20

_DISAMBIG_TITLE = re.compile(r"\(disambiguation\)\s*$", re.IGNORECASE)
_EMPTY_PARENS = re.compile(r" ?\(\s*[,;]?\s*\)")  # left where templates were dropped upstream: "Shanghai () is"
_MAY_REFER = re.compile(r"\bmay (?:also )?refer to:?\s*$", re.IGNORECASE)


def require_file(path: str | os.PathLike, what: str = "input file") -> Path:
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: {what} does not exist")
    if not p.is_file():
        raise InputError(f"{p}: {what} is not a regular file")
    return p


def open_binary(path: str | os.PathLike) -> BinaryIO:
    """Open a file for reading bytes, decompressing .bz2/.gz transparently (streaming)."""
    name = str(path)
    if name.endswith(".bz2"):
        return bz2.open(name, "rb")
    if name.endswith(".gz"):
        return gzip.open(name, "rb")
    return open(name, "rb")


def read_lines(path: str, start: int = 0) -> Iterator[bytes]:
    """The raw lines of a (possibly compressed) file from byte ``start`` (uncompressed files only); a
    truncated or corrupt compressed file becomes an InputError naming it."""
    try:
        with open_binary(path) as f:
            if start:
                f.seek(start)
            yield from f
    except (OSError, EOFError) as e:
        raise InputError(f"{path}: cannot read, the file is truncated or corrupt: {e}") from e


def is_compressed(path: str | os.PathLike) -> bool:
    return str(path).endswith((".bz2", ".gz"))


def line_aligned_ranges(path: str, target: int, is_start: Callable[[bytes], bool]) -> list[tuple[int, int, int]]:
    """Split an uncompressed file into byte ranges of about ``target`` bytes, each starting at a line for
    which ``is_start(line)`` holds. Returns (start, end, first_line) with end=-1 for the last range.

    Lines are counted with bytes.count over whole blocks (fast) and read one by one only near each cut, so
    planning costs one sequential read of the file and memory stays bounded by a block plus one line.
    """
    cuts = [(0, 1)]
    pos, line = 0, 1
    with open(path, "rb") as f:
        while True:
            goal = cuts[-1][0] + target
            while pos < goal:
                block = f.read(min(_BLOCK, goal - pos))
                if not block:
                    return _ranges(cuts)
                pos += len(block)
                line += block.count(b"\n")
            rest = f.readline()  # finish the line we stopped inside
            pos += len(rest)
            line += rest.count(b"\n")
            while True:
                text = f.readline()
                if not text:
                    return _ranges(cuts)
                if is_start(text):
                    cuts.append((pos, line))
                    pos += len(text)
                    line += text.count(b"\n")
                    break
                pos += len(text)
                line += text.count(b"\n")


def _ranges(cuts: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    return [(s, cuts[i + 1][0] if i + 1 < len(cuts) else -1, first) for i, (s, first) in enumerate(cuts)]


def group_by_size(sizes: list[int], target: int) -> list[tuple[int, int]]:
    """Consecutive index ranges [a, b) whose summed size reaches ``target`` (the last may be smaller)."""
    groups, start, acc = [], 0, 0
    for i, size in enumerate(sizes):
        acc += size
        if acc >= target:
            groups.append((start, i + 1))
            start, acc = i + 1, 0
    if start < len(sizes):
        groups.append((start, len(sizes)))
    return groups


def make_chunks(kind: str, path: str, input_index: int, ranges: list[tuple[int, int]], options: dict) -> list[Chunk]:
    opts = tuple(sorted((k, v) for k, v in options.items() if v is not None))
    return [Chunk(kind, path, input_index, i, s, e, opts) for i, (s, e) in enumerate(ranges)]


def paragraphs_from_lines(text: str, title: str | None = None) -> str:
    """Plain text with one paragraph (or heading) per line -> paragraphs separated by blank lines.

    WikiExtractor-style text repeats the title as its first line; that copy is dropped because the title
    is carried separately in ``Document.title``.
    """
    text = _EMPTY_PARENS.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    lines = [ln.strip() for ln in text.split("\n")]
    lines = [ln for ln in lines if ln]
    if title is not None and lines and lines[0] == title.strip():
        lines = lines[1:]
    return "\n\n".join(lines)


def looks_like_disambiguation(title: str, text: str) -> bool:
    """Plain-text disambiguation rule (templates are gone in these formats): the title ends in
    "(disambiguation)", or the first paragraph ends in "may refer to:" as Wikipedia's style guide
    prescribes for disambiguation pages (MOS:DABPAGE)."""
    if _DISAMBIG_TITLE.search(title):
        return True
    first = text.split("\n\n", 1)[0]
    return len(first) < 500 and bool(_MAY_REFER.search(first))

"""WikiText-2/-103 token files (wiki.train.tokens, valid.txt, ...): many articles in one file.

Article rule: a line `` = Title = `` (one ``=`` each side, not ``= =``) with a blank line before it (or
the start of the file) and a blank line after it. The blank-line condition is what rejects the two
equation lines of WikiText-2's test.txt (``= 1 <unk> / s and a nominal <unk> k =``, lines 2149 and
2151) that match the bare pattern. Sub-headings `` = = X = = `` stay in the article as their own
line, text only ("X"), like headings of the other formats; paragraphs are separated by blank lines.

Keys are "wikitext:<file name>:<title>"; WikiText titles repeat (``= <unk> =`` ...), so the n-th
occurrence of a title in a file (n >= 2) gets "#n" appended. Chunking: byte ranges cut at article
headings; the planner reads the file once and passes each chunk its first line number and how often its
titles occurred in earlier chunks, so keys do not depend on the chunking.

Skipped and counted: "no_title" (text before the first heading), "invalid_utf8" (the article holding
the line), "too_long", "empty".
"""
from __future__ import annotations

import os
import re
from bisect import bisect_right
from collections import Counter
from typing import Iterator

from data_prep.documents import Chunk, Document, SkipReport
from data_prep.readers.common import DEFAULT_MAX_CHARS, require_file

_SUBHEADING = re.compile(r"^=(?: =)+ (.*?) =(?: =)+$")  # "= = X = =", "= = = X = = =" (not the equations)


def _title(raw: bytes) -> bytes | None:
    s = raw.strip()
    if len(s) > 4 and s.startswith(b"= ") and s.endswith(b" =") and not s.startswith(b"= ="):
        return s[2:-2].strip() or None
    return None


def looks_like_wikitext(head: bytes) -> bool:
    """True when the first non-blank line of ``head`` is an article heading."""
    for raw in head.split(b"\n")[:-1]:
        if raw.strip():
            return _title(raw) is not None
    return False


def scan(path: str, start: int = 0, end: int = -1, first_line: int = 1) -> Iterator[tuple[int, int, bytes, bytes | None]]:
    """(byte offset, line number, raw line, title if the line starts an article) for [start, end).

    The line before ``start`` counts as blank (chunks begin at headings, which have one before them);
    past ``end`` the next line is the following chunk's heading (not blank), past the end of the file
    it counts as blank.
    """
    with open(path, "rb") as f:
        f.seek(start)
        pos, line, prev_blank = start, first_line, True
        cur = f.readline() if end < 0 or start < end else b""
        while cur:
            nxt = f.readline() if end < 0 or pos + len(cur) < end else None
            next_blank = nxt is not None and not nxt.strip()
            title = _title(cur) if prev_blank and next_blank else None
            yield pos, line, cur, title
            prev_blank = not cur.strip()
            pos, line, cur = pos + len(cur), line + 1, nxt or b""


def plan(spec, fmt: str, input_index: int, target: int) -> list[Chunk]:
    path = str(require_file(spec.path))
    starts = [(pos, line, title.decode("utf-8", "replace")) for pos, line, _, title in scan(path) if title is not None]
    cuts = [(0, 1)]
    for pos, line, _ in starts:
        if pos - cuts[-1][0] >= target:
            cuts.append((pos, line))
    # How often each title occurred before the chunk it reappears in, so "#n" keys match a single pass.
    offsets = [pos for pos, _ in cuts]
    prior: list[dict[str, int]] = [{} for _ in cuts]
    seen: Counter[str] = Counter()
    for pos, _, title in starts:
        c = bisect_right(offsets, pos) - 1
        prior[c].setdefault(title, seen[title])  # occurrences before this chunk's first one
        seen[title] += 1
    chunks = []
    for i, (start, first_line) in enumerate(cuts):
        end = cuts[i + 1][0] if i + 1 < len(cuts) else -1
        options = {"first_line": first_line, "max_chars": spec.max_chars, "group": spec.group,
                   "title_counts": tuple(sorted((t, n) for t, n in prior[i].items() if n))}
        chunks.append(Chunk("wikitext", path, input_index, i, start, end,
                            tuple(sorted((k, v) for k, v in options.items() if v is not None))))
    return chunks


def read(chunk: Chunk, report: SkipReport) -> Iterator[Document]:
    path = chunk.path
    require_file(path)
    name = os.path.basename(path)
    max_chars = chunk.option("max_chars", DEFAULT_MAX_CHARS)
    counts = Counter(dict(chunk.option("title_counts", ())))
    title, start_line, lines, bad = None, 0, [], None

    def finish() -> Document | None:
        if title is None:
            if any(ln.strip() for ln in lines):
                report.skip(path, f"lines {chunk.option('first_line', 1)}-{start_line}", "no_title")
            return None
        counts[title] += 1
        key = f"wikitext:{name}:{title}" + (f"#{counts[title]}" if counts[title] > 1 else "")
        record = f"line {start_line} [[{title}]]"
        if bad is not None:
            report.skip(path, f"{record}: line {bad} is not valid UTF-8", "invalid_utf8")
            return None
        text = "\n\n".join(_paragraph(ln) for ln in lines if ln.strip())
        if len(text) > max_chars:
            report.skip(path, record, "too_long")
            return None
        if not text:
            report.skip(path, record, "empty")
            return None
        return Document(key, title, text, None, None, chunk.option("group"), f"{path}:line {start_line}")

    for _, line, raw, heading in scan(path, chunk.start, chunk.end, chunk.option("first_line", 1)):
        if heading is not None:
            doc = finish()
            if doc is not None:
                yield doc
            title, start_line, lines, bad = heading.decode("utf-8", "replace"), line, [], None
            continue
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            bad = line if bad is None else bad
    doc = finish()
    if doc is not None:
        yield doc


def _paragraph(line: str) -> str:
    line = line.strip()
    m = _SUBHEADING.match(line)
    return m.group(1).strip() if m else line

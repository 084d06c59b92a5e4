"""MediaWiki XML dumps: plain .xml, single-stream .xml.bz2, and multistream .bz2 with its -index.txt.bz2.

Pages are cut out of the byte stream at ``<page>`` ... ``</page>`` (in well-formed XML these bytes can
only be tags: text content escapes ``<``), and each page alone is parsed with ElementTree, so memory is
bounded by one page and a read block whatever the dump size, and pages need no enclosing root (a
multistream stream holds bare pages).

Chunking: multistream dumps split at the stream offsets of the index (each task decompresses only its
own streams); plain .xml splits at lines starting with ``<page>``; a single-stream .bz2 is one chunk
(bzip2 blocks are bit-aligned, there is no safe place to cut it).

Policies: a truncated or corrupt bz2 stream is fatal (InputError naming the file and the byte offset
of the stream; pages before it were already yielded, but the task fails so a partial dump is never
taken for a whole one). Malformed XML in a page is fatal (file, page, line). A page with invalid UTF-8
is skipped ("invalid_utf8"). Skipped and counted: "namespace" (not ns 0), "redirect", "too_long" (raw
wikitext over max_chars, checked before the costly parse), "disambiguation", "empty",
"duplicate_page_id" (within the chunk).
"""
from __future__ import annotations

import bz2
import os
import re
import xml.etree.ElementTree as ET
from contextlib import closing
from typing import Iterator
from urllib.parse import quote

from data_prep.clean_wikitext import clean_wikitext, is_redirect
from data_prep.documents import Chunk, Document, InputError, SkipReport
from data_prep.readers.common import DEFAULT_MAX_CHARS, line_aligned_ranges, make_chunks, require_file

_READ_BLOCK = 1 << 20
_MAX_OUT = 8 << 20  # decompressed bytes per call: bounds memory against highly compressible data
_OPEN, _CLOSE = b"<page>", b"</page>"
_BASE = re.compile(rb"<base>\s*(.*?)\s*</base>", re.DOTALL)
_TITLE = re.compile(rb"<title>(.*?)</title>", re.DOTALL)
_ID = re.compile(rb"<id>\s*(\d+)\s*</id>")


def index_for(path: str) -> str | None:
    """The multistream index next to a dump, named as Wikimedia names it."""
    name = os.path.basename(path)
    if "multistream" in name and name.endswith(".xml.bz2"):
        candidate = os.path.join(os.path.dirname(path), name[: -len(".xml.bz2")] + "-index.txt.bz2")
        if os.path.exists(candidate):
            return candidate
    return None


def plan(spec, fmt: str, input_index: int, target: int) -> list[Chunk]:
    path = str(require_file(spec.path))
    options = {"max_chars": spec.max_chars, "group": spec.group}
    if path.endswith(".bz2"):
        with closing(bz2_blocks(path, 0, -1)) as blocks:
            header = next(blocks, (b"", 0))[0][:65536]
        options["base_url"] = _base_url(header, path)
        index = spec.index_path or index_for(path)
        if not index:
            return make_chunks("mediawiki", path, input_index, [(0, -1)], options)
        require_file(index, "multistream index")
        ranges = _stream_ranges(path, read_index_offsets(index), target)
        return make_chunks("mediawiki", path, input_index, ranges, dict(options, multistream=True))
    with open(path, "rb") as f:
        options["base_url"] = _base_url(f.read(65536), path)
    ranges = line_aligned_ranges(path, target, lambda line: line.lstrip().startswith(_OPEN))
    return [
        Chunk("mediawiki", path, input_index, i, start, end, tuple(sorted(
            (k, v) for k, v in dict(options, first_line=first).items() if v is not None)))
        for i, (start, end, first) in enumerate(ranges)
    ]


def _base_url(header: bytes, path: str) -> str | None:
    if b"<mediawiki" not in header:
        raise InputError(f"{path}: not a MediaWiki XML export (no <mediawiki> element at the start)")
    m = _BASE.search(header)
    if not m:
        return None
    base = m.group(1).decode("utf-8", "replace")
    return base.rsplit("/", 1)[0] + "/" if "/wiki/" in base else None


def read_index_offsets(index: str) -> list[int]:
    """Sorted distinct stream offsets from ``offset:page_id:title`` lines (bz2, possibly multistream)."""
    offsets: set[int] = set()
    last = -1
    try:
        with bz2.open(index, "rb") as f:
            for n, line in enumerate(f, 1):
                head, sep, _ = line.partition(b":")
                if not sep or not head.strip().isdigit():
                    if not line.strip():
                        continue
                    raise InputError(f"{index}: line {n}: expected 'offset:page_id:title', got {line[:80]!r}")
                offset = int(head)
                if offset != last:  # consecutive lines share a stream: skip the set lookup
                    offsets.add(offset)
                    last = offset
    except (OSError, EOFError) as e:
        raise InputError(f"{index}: cannot read the multistream index: {e}") from e
    if not offsets:
        raise InputError(f"{index}: multistream index lists no streams")
    return sorted(offsets)


def _stream_ranges(path: str, offsets: list[int], target: int) -> list[tuple[int, int]]:
    size = os.path.getsize(path)
    if offsets[-1] >= size:
        beyond = next(o for o in offsets if o >= size)
        raise InputError(f"{path}: the index lists a stream at byte {beyond}, beyond the end of the file ({size} bytes): "
                         "the dump is truncated or the index belongs to another dump")
    ranges, start = [], 0  # the first chunk also covers the header stream (siteinfo, no pages)
    for offset in offsets[1:]:
        if offset - start >= target:
            ranges.append((start, offset))
            start = offset
    ranges.append((start, -1))
    return ranges


def bz2_blocks(path: str, start: int, end: int) -> Iterator[tuple[bytes, int]]:
    """Decompress the bz2 streams in [start, end) of ``path``: yields (data, offset of its stream)."""
    with open(path, "rb") as f:
        f.seek(start)
        pos = stream = start
        dec, fed = bz2.BZ2Decompressor(), False

        def more() -> bytes:
            nonlocal pos
            n = _READ_BLOCK if end < 0 else min(_READ_BLOCK, end - pos)
            data = f.read(n) if n > 0 else b""
            pos += len(data)
            return data

        while True:
            if dec.eof:
                data = dec.unused_data
                stream = pos - len(data)
                dec, fed = bz2.BZ2Decompressor(), False
                data = data or more()
                if not data:
                    return
            elif dec.needs_input:
                data = more()
                if not data:
                    if fed:
                        where = "the chunk end set by the index" if end >= 0 and pos >= end else "the end of the file"
                        raise InputError(
                            f"{path}: bz2 data truncated: the stream starting at byte {stream} reaches {where} "
                            f"(byte {pos}) without its end marker; the file is incomplete or the index does not match"
                        )
                    return
            else:
                data = b""
            try:
                out = dec.decompress(data, _MAX_OUT)
            except (OSError, EOFError, ValueError) as e:
                raise InputError(f"{path}: corrupt bz2 data in the stream starting at byte {stream}: {e}") from e
            fed = fed or bool(data)
            if out:
                yield out, stream


def _plain_blocks(path: str, start: int, end: int) -> Iterator[tuple[bytes, int]]:
    with open(path, "rb") as f:
        f.seek(start)
        pos = start
        while end < 0 or pos < end:
            data = f.read(_READ_BLOCK if end < 0 else min(_READ_BLOCK, end - pos))
            if not data:
                return
            pos += len(data)
            yield data, -1


def split_pages(blocks: Iterator[tuple[bytes, int]], first_line: int, max_bytes: int, name: str = "<bytes>"):
    """Yield (page bytes or None if over ``max_bytes``, line of its <page>, stream offset, head bytes).

    A cursor walks the buffer and consumed bytes are dropped once per block (not once per page: a block
    of redirects holds hundreds of pages). A page over ``max_bytes`` is not kept whole: its first 4 KiB
    name it in the report, the rest is dropped as it streams by.
    """
    buf = bytearray()
    at = 0  # cursor: bytes before it are consumed
    line, in_page, skipping, search, page_line, page_stream, head = first_line, False, False, 0, 0, -1, b""
    for data, stream in blocks:
        del buf[:at]
        search -= at
        at = 0
        buf += data
        while True:
            if not in_page:
                s = buf.find(_OPEN, at)
                if s < 0:
                    keep = max(at, len(buf) - len(_OPEN))  # a tag may straddle two blocks
                    line += buf.count(b"\n", at, keep)
                    at = keep
                    break
                line += buf.count(b"\n", at, s)
                at, in_page, skipping, search, page_line, page_stream = s, True, False, s, line, stream
            e = buf.find(_CLOSE, search)
            if e < 0:
                search = max(at, len(buf) - len(_CLOSE))
                if len(buf) - at > max_bytes:  # drop the body, keep the head to name the page
                    if not skipping:
                        head, skipping = bytes(buf[at:at + 4096]), True
                    line += buf.count(b"\n", at, search)
                    at = search
                break
            e += len(_CLOSE)
            if e - at > max_bytes and not skipping:
                head, skipping = bytes(buf[at:at + 4096]), True
            line += buf.count(b"\n", at, e)
            page = None if skipping else bytes(buf[at:e])
            at, in_page, search = e, False, e
            yield (page, page_line, page_stream, head if skipping else b"")
    if in_page:
        raise InputError(f"{name}: page starting at line {page_line} has no </page>: the XML is truncated")


def read(chunk: Chunk, report: SkipReport) -> Iterator[Document]:
    path = chunk.path
    require_file(path)
    max_chars = chunk.option("max_chars", DEFAULT_MAX_CHARS)
    multistream = chunk.option("multistream", False)
    if path.endswith(".bz2"):
        blocks = bz2_blocks(path, chunk.start, chunk.end)
    else:
        blocks = _plain_blocks(path, chunk.start, chunk.end)
    ctx = _Context(path, max_chars, chunk.option("base_url"), chunk.option("group"), report)
    pages = split_pages(blocks, chunk.option("first_line", 1), 8 * max_chars + (1 << 20), path)
    while True:
        try:
            raw, line, stream, head = next(pages)
        except StopIteration:
            return
        where = f"stream at byte {stream}, line {line} of the chunk" if multistream else f"line {line}"
        if raw is None:
            report.skip(path, _describe(head, where), "too_long")
            continue
        doc = ctx.page(raw, line, where)
        if doc is not None:
            yield doc


def _describe(raw: bytes, where: str) -> str:
    t, i = _TITLE.search(raw), _ID.search(raw)
    title = t.group(1).decode("utf-8", "replace") if t else "?"
    return f"page {i.group(1).decode() if i else '?'} [[{title}]] ({where})"


class _Context:
    """Per-chunk state: where pages come from, the options, and the page ids seen so far."""

    def __init__(self, path: str, max_chars: int, base_url: str | None, group: str | None, report: SkipReport):
        self.path, self.max_chars, self.base_url, self.group, self.report = path, max_chars, base_url, group, report
        self.seen: set[int] = set()

    def page(self, raw: bytes, line: int, where: str) -> Document | None:
        path, report = self.path, self.report
        try:
            text_xml = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            report.skip(path, f"{_describe(raw, where)}: byte {e.start} of the page", "invalid_utf8")
            return None
        try:
            page = ET.fromstring(text_xml)
        except ET.ParseError as e:
            row, col = e.position
            problem = str(e).split(": line ")[0]  # its own line number counts from the page, ours from the file
            raise InputError(
                f"{path}: malformed XML in {_describe(raw, where)}: line {line + row - 1}, column {col}: {problem}"
            ) from None
        title = (page.findtext("title") or "").strip()
        id_text = (page.findtext("id") or "").strip()
        if not id_text.isdigit():
            raise InputError(f"{path}: page [[{title}]] ({where}) has no numeric <id>")
        page_id = int(id_text)
        record = f"page {page_id} [[{title}]]"
        if page_id in self.seen:
            report.skip(path, f"{record} ({where})", "duplicate_page_id")
            return None
        self.seen.add(page_id)
        if (page.findtext("ns") or "0").strip() != "0":
            report.skip(path, record, "namespace")
            return None
        revisions = page.findall("revision")
        raw_text = (revisions[-1].findtext("text") or "") if revisions else ""
        if page.find("redirect") is not None or is_redirect(raw_text):
            report.skip(path, record, "redirect")
            return None
        if len(raw_text) > self.max_chars:
            report.skip(path, record, "too_long")
            return None
        cleaned = clean_wikitext(raw_text, title)
        if cleaned.disambiguation:
            report.skip(path, record, "disambiguation")
            return None
        if not cleaned.text:
            report.skip(path, record, "empty")
            return None
        url = self.base_url + quote(title.replace(" ", "_"), safe="/:()!,'*;@$~-_.") if self.base_url else None
        return Document(f"wiki:{page_id}", title, cleaned.text, page_id, url, self.group, f"{path}:page {page_id}")

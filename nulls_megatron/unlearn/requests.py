"""Deletion requests -> source indices, through the sources manifest the checkpoint was trained on.

A request names a source by title, page id, dense source index or group (a book series). Every
request of a batch (``--from-file``: one per line) is resolved before anything is written; a
batch with any bad line is refused whole, with a report line per request.

File format (``--from-file``): one request per line; ``#`` starts a comment, blank lines are
skipped. ``index:N``, ``page_id:N``, ``group:NAME`` and ``title:TEXT`` name the kind; a bare
line is a title.
"""
from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_prep.manifest import Manifest, normalize_title

KINDS = ("title", "page_id", "index", "group")
_CLOSE_TITLES = 5
_DIFFLIB_LIMIT = 200_000  # above this many candidate titles, narrow by a shared word first


class RequestError(ValueError):
    """One or more requests do not resolve to exactly the sources they name; nothing was changed."""

    def __init__(self, message: str, report: list[dict]):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class Request:
    kind: str  # one of KINDS
    value: str
    origin: str  # "--title" or "requests.txt:3"


@dataclass(frozen=True)
class ResolvedSource:
    index: int
    title: str
    page_id: int | None
    group: str | None
    key: str

    def to_json(self) -> dict:
        return asdict(self)


def read_utf8(path: str | Path, what: str) -> str:
    """The text of a file a user names (``what``: "request file", ...), with errors that name it."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None


def parse_request_file(path: str | Path) -> list[Request]:
    """The requests of a ``--from-file`` file; an empty file (no request line) is an error."""
    path = Path(path)
    text = read_utf8(path, "request file")
    requests = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip() if not raw.lstrip().startswith("title:") else raw.strip()
        if not line:
            continue
        kind, _, rest = line.partition(":")
        if rest and kind.strip() in KINDS:
            requests.append(Request(kind.strip(), rest.strip(), f"{path}:{number}"))
        else:
            requests.append(Request("title", line, f"{path}:{number}"))
    if not requests:
        raise ValueError(f"{path}: no request in the file (one title, index:N, page_id:N or group:NAME per line)")
    return requests


class SourceResolver:
    """Resolves requests against one sources manifest (a prep output folder)."""

    def __init__(self, prep_dir: str | Path) -> None:
        self.manifest = Manifest(prep_dir)
        self._columns: dict[str, pa.ChunkedArray] = {}

    def __len__(self) -> int:
        return len(self.manifest)

    def _column(self, name: str) -> pa.ChunkedArray:
        if name not in self._columns:
            self._columns[name] = self.manifest.table([name])[name]
        return self._columns[name]

    def source(self, index: int) -> ResolvedSource:
        row = self.manifest.row(index, ["title", "page_id", "group", "key"])
        return ResolvedSource(index, row["title"], row["page_id"], row["group"], row["key"])

    def closest_titles(self, title: str, n: int = _CLOSE_TITLES) -> list[str]:
        titles = self._column("title")
        if len(titles) > _DIFFLIB_LIMIT:
            # difflib over millions of titles takes minutes: keep titles sharing the query's longest word.
            words = sorted(normalize_title(title).split(), key=len, reverse=True)
            if not words:
                return []
            hit = pc.match_substring(titles, words[0], ignore_case=True)
            titles = pc.filter(titles, hit).slice(0, _DIFFLIB_LIMIT)
        pool = [t for t in titles.to_pylist() if t]
        by_norm = {normalize_title(t).lower(): t for t in pool}
        close = difflib.get_close_matches(normalize_title(title).lower(), list(by_norm), n=n, cutoff=0.5)
        return [by_norm[c] for c in close]

    def resolve_one(self, request: Request) -> list[ResolvedSource]:
        """The sources a request names; raises ValueError saying why it names none or too many."""
        kind, value = request.kind, request.value
        if kind == "index":
            index = _integer(value, "source index")
            if not 0 <= index < len(self):
                raise ValueError(f"source index {index} is out of range: the manifest has {len(self)} sources (0..{len(self) - 1})")
            return [self.source(index)]
        if kind == "page_id":
            page = _integer(value, "page id")
            hits = np.flatnonzero(pc.equal(self._column("page_id"), page).to_numpy(zero_copy_only=False) == True)  # noqa: E712
            if not len(hits):
                raise ValueError(f"no source has page id {page}")
            return [self.source(int(i)) for i in hits]
        if kind == "group":
            hits = np.flatnonzero(pc.equal(self._column("group"), value).to_numpy(zero_copy_only=False) == True)  # noqa: E712
            if not len(hits):
                groups = sorted(g for g in pc.unique(self._column("group")).to_pylist() if g)
                known = ", ".join(groups[:10]) + (" ..." if len(groups) > 10 else "") if groups else "none"
                raise ValueError(f"no source is in group {value!r} (groups: {known})")
            return [self.source(int(i)) for i in hits]
        if kind == "title":
            hits = self.manifest.lookup_title(value)
            if not hits:
                close = self.closest_titles(value)
                hint = "; closest titles: " + "; ".join(repr(t) for t in close) if close else ""
                raise ValueError(f"no source is titled {value!r}{hint}")
            if len(hits) > 1:
                found = [self.source(i) for i in hits]
                listing = "; ".join(f"index {s.index} (page id {s.page_id}, group {s.group})" for s in found)
                raise ValueError(f"title {value!r} is ambiguous: {listing}; request one by index:N or page_id:N")
            return [self.source(hits[0])]
        raise ValueError(f"unknown request kind {kind!r} (one of {', '.join(KINDS)})")

    def resolve(self, requests: Iterable[Request]) -> tuple[list[ResolvedSource], list[dict]]:
        """All sources the requests name (deduplicated, in index order) and the per-request report.
        Raises :class:`RequestError` with the report when any request fails."""
        report, sources = [], {}
        for r in requests:
            try:
                found = self.resolve_one(r)
            except ValueError as e:
                report.append({"origin": r.origin, "request": f"{r.kind}:{r.value}", "ok": False, "error": str(e)})
                continue
            dup = [s.index for s in found if s.index in sources]
            report.append({"origin": r.origin, "request": f"{r.kind}:{r.value}", "ok": True,
                           "sources": [s.index for s in found], "titles": [s.title for s in found],
                           **({"duplicate_of_earlier": dup} if dup else {})})
            sources.update({s.index: s for s in found})
        bad = [r for r in report if not r["ok"]]
        if bad:
            lines = "\n".join(f"  {r['origin']}: {r['request']}: {r['error']}" for r in bad)
            raise RequestError(f"{len(bad)} of {len(report)} requests failed; nothing was changed:\n{lines}", report)
        return [sources[i] for i in sorted(sources)], report


def _integer(value: str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{what} {value!r} is not an integer") from None

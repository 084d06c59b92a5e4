"""The contract between the readers and the pipeline: documents, chunks of work, skip reports, input errors.

Readers turn a :class:`Chunk` of one input into :class:`Document` objects and record every record they
drop in a :class:`SkipReport`; the pipeline numbers sources from ``Document.key`` and merges the reports
of all Ray tasks into ``prep_report.json``. Nothing here imports the readers or the pipeline.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class InputError(ValueError):
    """Fatal bad input: the message names the file, the record and what is wrong."""


@dataclass(frozen=True)
class Document:
    """One source document, already cleaned to plain text."""

    key: str  # stable unique identity: "wiki:<page_id>", "wikitext:<file>:<title>", "book:<group or ''>/<file>"
    title: str
    text: str  # plain text; headings on their own lines; paragraphs separated by blank lines
    page_id: int | None
    url: str | None
    group: str | None  # e.g. a book series, so a whole group can be forgotten at once
    origin: str  # "<file>:<record>" for error messages


@dataclass(frozen=True)
class Chunk:
    """One unit of parallel work over one input; ordered by (input_index, chunk_index).

    ``start``/``end`` mean, per kind: mediawiki multistream and jsonl = byte offsets, parquet = row
    groups, books = file indices in the sorted file list, wikiextractor = file indices in the sorted
    file list, wikitext/plain xml = whole file (0, -1). ``end == -1`` means to the end.
    """

    kind: str  # "mediawiki" | "jsonl" | "parquet" | "wikiextractor" | "wikitext" | "books"
    path: str
    input_index: int
    chunk_index: int
    start: int
    end: int
    options: tuple = ()  # per-kind extras as (key, value) pairs

    def option(self, key: str, default: Any = None) -> Any:
        for k, v in self.options:
            if k == key:
                return v
        return default


class SkipReport:
    """Counts of skipped records per reason plus the first entries, mergeable across Ray tasks."""

    def __init__(self, max_entries: int = 10_000) -> None:
        # Entries are capped so a dump with millions of redirects does not blow up task results;
        # counts stay exact, and the overflow is counted in ``dropped_entries``.
        self.max_entries = max_entries
        self._counts: Counter[str] = Counter()
        self.entries: list[tuple[str, str, str]] = []
        self.dropped_entries = 0

    def skip(self, file: str, record: str, reason: str) -> None:
        self._counts[reason] += 1
        if len(self.entries) < self.max_entries:
            self.entries.append((str(file), str(record), reason))
        else:
            self.dropped_entries += 1

    def merge(self, other: "SkipReport") -> None:
        self._counts.update(other._counts)
        room = max(0, self.max_entries - len(self.entries))
        self.entries.extend(other.entries[:room])
        self.dropped_entries += other.dropped_entries + max(0, len(other.entries) - room)

    def counts(self) -> dict[str, int]:
        return dict(sorted(self._counts.items()))

    def total(self) -> int:
        return sum(self._counts.values())

    def to_dict(self, max_entries: int = 1000) -> dict:
        shown = self.entries[:max_entries]
        return {
            "counts": self.counts(),
            "total": self.total(),
            "entries": [{"file": f, "record": r, "reason": why} for f, r, why in shown],
            "entries_not_shown": self.dropped_entries + len(self.entries) - len(shown),
        }

    def state(self) -> dict:
        """Everything, as plain JSON data (for done-markers; ``from_state`` reads it back)."""
        return {"max_entries": self.max_entries, "counts": dict(self._counts),
                "entries": [list(e) for e in self.entries], "dropped_entries": self.dropped_entries}

    @classmethod
    def from_state(cls, state: dict) -> "SkipReport":
        report = cls(int(state["max_entries"]))
        report._counts.update({str(k): int(v) for k, v in state["counts"].items()})
        report.entries = [(str(f), str(r), str(why)) for f, r, why in state["entries"]]
        report.dropped_entries = int(state["dropped_entries"])
        return report

    def write_json(self, path: str | os.PathLike, max_entries: int = 1000) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.to_dict(max_entries), f, indent=2, ensure_ascii=False)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def __repr__(self) -> str:
        return f"SkipReport({self.counts()})"

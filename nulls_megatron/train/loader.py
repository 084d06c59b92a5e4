"""Stream packed training batches from the prep output (docs/loader.md).

Each epoch has a seeded order: a permutation of the shards, and a seeded shuffle of the documents
inside each shard. Laid end to end, that order is cut into ``dp_world`` contiguous blocks of documents
(sizes differ by at most one); data-parallel rank ``r`` reads block ``r`` only. Documents stream into
``pack_documents`` without a break at epoch ends, so no row is padded. The cursor (epoch, position in
the rank's block, token offset in that document) of the first token of the next row is the whole
resume state; restoring it opens one shard, found by the document counts of the shard index.

Documents of ``skip_sources`` (the forgotten sources of the checkpoint being resumed) are dropped as
they are read, before packing: they never reach a batch. Skipping is a function of the same data
order, so the cursor stays exact; the state counts the skipped documents and tokens up to the cursor.
"""
from __future__ import annotations

import hashlib
import io
import json
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import numpy as np

from data_prep.shards import SHARD_DIR, SHARD_INDEX_NAME
from nulls_megatron.train.packing import PackedRows, pack_documents

STATE_FORMAT = 1
_TOKENS_SUFFIX = ".tokens.npy"
_HASH_BLOCK = 8 << 20
_TAR_BLOCK = 512
_ZERO_BLOCK = bytes(_TAR_BLOCK)


class LoaderError(ValueError):
    """The prep output is missing, incomplete or not what its shard index says; the message names the file."""


@dataclass(frozen=True)
class ShardEntry:
    number: int  # position in the shard index (seeds the within-shard shuffle)
    path: Path
    documents: int
    tokens: int
    bytes: int
    sha256: str
    first_source: int
    last_source: int


@dataclass(frozen=True)
class ShardIndex:
    path: Path
    sha256: str  # of shard_index.json: a resume state is only valid for the same data
    shards: list[ShardEntry]
    documents: int
    tokens: int


def read_shard_index(prep_dir: str | Path) -> ShardIndex:
    """Read and check ``<prep_dir>/shard_index.json``; errors name the file and the field."""
    path = Path(prep_dir) / SHARD_INDEX_NAME
    if not path.is_file():
        raise LoaderError(f"{path}: shard index not found (is {prep_dir} an output folder of `nulls prep`?)")
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise LoaderError(f"{path}: not valid JSON: {e}") from None
    shards = data.get("shards") if isinstance(data, dict) else None
    if not isinstance(shards, list) or not shards:
        raise LoaderError(f"{path}: 'shards' must be a non-empty list")
    entries = []
    for i, s in enumerate(shards):
        where = f"{path}: shards[{i}]"
        if not isinstance(s, dict):
            raise LoaderError(f"{where}: must be an object")
        for field, kind in (("name", str), ("sha256", str), ("documents", int), ("tokens", int), ("bytes", int),
                            ("first_source", int), ("last_source", int)):
            if not isinstance(s.get(field), kind) or isinstance(s.get(field), bool):
                raise LoaderError(f"{where}.{field}: missing or not a {kind.__name__}: {s.get(field)!r}")
        if Path(s["name"]).name != s["name"]:
            raise LoaderError(f"{where}.name: must be a bare file name, got {s['name']!r}")
        if s["documents"] <= 0:
            raise LoaderError(f"{where}.documents: must be > 0, got {s['documents']}")
        entries.append(ShardEntry(i, path.parent / SHARD_DIR / s["name"], s["documents"], s["tokens"], s["bytes"],
                                  s["sha256"], s["first_source"], s["last_source"]))
    return ShardIndex(path, hashlib.sha256(raw).hexdigest(), entries,
                      sum(e.documents for e in entries), sum(e.tokens for e in entries))


def check_shard_files(index: ShardIndex) -> None:
    """Every shard of ``index`` exists and has the size the index says; else a LoaderError naming each
    bad file with the expected and the actual size.

    Run when the loader yields its first batch (step 0), so a truncated or missing later shard stops the
    run before it trains, not when the stream reaches that shard hundreds of steps in. One stat per
    shard: free at any corpus size. The sha256 is not computed here: it means reading every byte (tens
    of GB, minutes before step 0); ``verify`` still checks it when a shard is first opened, and a shard
    with the right size but other bytes (bit rot, a same-size replacement) is caught there."""
    problems: list[str] = []
    for entry in index.shards:
        try:
            size = entry.path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{entry.path}: shard listed in {index.path} is missing")
            continue
        if size != entry.bytes:
            why = "truncated: a partial copy or an interrupted write?" if size < entry.bytes else "larger than written: replaced?"
            problems.append(f"{entry.path}: {size} bytes on disk, {index.path} says {entry.bytes} ({why})")
    if problems:
        head = [] if len(problems) == 1 else [f"{len(problems)} of {len(index.shards)} shards do not match {index.path}:"]
        raise LoaderError("\n".join(head + problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])))


def _octal(field: bytes, path: Path, at: int) -> int:
    try:
        return int(field.strip(b" \0") or b"0", 8)
    except ValueError:
        raise LoaderError(f"{path}: bad tar header at byte {at}: number field {field!r}") from None


def scan_tar(f: BinaryIO, path: Path) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of every regular member of the (ustar/pax) tar ``f``.

    Python's tarfile parses each header field by field (~100 us a member here, 5 s for a 40k-member
    shard); the shards' members are plain files behind a pax header (mtime), so reading the name,
    size and type from each 512-byte header, checksum verified, is all that is needed (~10x faster).
    """
    members, at, pax = [], 0, {}
    while True:
        f.seek(at)
        block = f.read(_TAR_BLOCK)
        if len(block) < _TAR_BLOCK:
            raise LoaderError(f"{path}: tar ends inside a header at byte {at} (no end-of-archive blocks)")
        if block == _ZERO_BLOCK:
            return members
        if _octal(block[148:156], path, at) != sum(block[:148]) + 256 + sum(block[156:]):
            raise LoaderError(f"{path}: bad tar header checksum at byte {at}")
        size, kind = _octal(block[124:136], path, at), block[156:157]
        data = at + _TAR_BLOCK
        if kind == b"x":  # pax extended header: its records override the next member's fields
            records = f.read(size)
            while records:
                try:
                    length = int(records.split(b" ", 1)[0])
                    key, _, value = records[:length].split(b" ", 1)[1][:-1].partition(b"=")
                except (ValueError, IndexError):
                    raise LoaderError(f"{path}: bad pax record at byte {at}: {records[:40]!r}") from None
                pax[key] = value
                records = records[length:] if length > 0 else b""
        elif kind in (b"0", b"\0"):
            name = block[:100].split(b"\0", 1)[0]
            if block[257:262] == b"ustar" and block[345] != 0:
                name = block[345:500].split(b"\0", 1)[0] + b"/" + name
            name = pax.get(b"path", name)
            size = int(pax.get(b"size", size))
            members.append((name.decode("utf-8"), data, size))
        if kind != b"x":
            pax = {}
        at = data + -(-size // _TAR_BLOCK) * _TAR_BLOCK


class _ShardReader:
    """Random access to one shard's documents: the tar headers are read once (seeking past the data),
    then each document is one seek + read, so memory holds one document, not the shard."""

    def __init__(self, entry: ShardEntry, index_path: Path, verify: bool, vocab_size: int) -> None:
        self.entry, self.vocab_size = entry, vocab_size
        path = entry.path
        if not path.is_file():
            raise LoaderError(f"{path}: shard listed in {index_path} is missing")
        if path.stat().st_size != entry.bytes:
            raise LoaderError(f"{path}: {path.stat().st_size} bytes, {index_path} says {entry.bytes} (truncated or replaced?)")
        self.file = open(path, "rb")
        try:
            if verify:
                digest = hashlib.sha256()
                while block := self.file.read(_HASH_BLOCK):
                    digest.update(block)
                if digest.hexdigest() != entry.sha256:
                    raise LoaderError(f"{path}: sha256 {digest.hexdigest()} does not match {index_path} ({entry.sha256})")
                self.file.seek(0)
            members = scan_tar(self.file, path)
            self.samples = [(name[: -len(_TOKENS_SUFFIX)], at, size) for name, at, size in members if name.endswith(_TOKENS_SUFFIX)]
            if len(self.samples) != entry.documents:
                raise LoaderError(f"{path}: {len(self.samples)} samples with tokens.npy, {index_path} says {entry.documents}")
        except BaseException:
            self.file.close()
            raise

    def document(self, i: int) -> tuple[int, np.ndarray]:
        """(source index, tokens) of the shard's ``i``-th sample (tar order = source order)."""
        key, at, size = self.samples[i]
        where = f"{self.entry.path}: sample {key}"
        if not key.isdigit() or not self.entry.first_source <= int(key) <= self.entry.last_source:
            raise LoaderError(f"{where}: key is not a source index in [{self.entry.first_source}, {self.entry.last_source}]")
        try:
            self.file.seek(at)
            tokens = np.load(io.BytesIO(self.file.read(size)), allow_pickle=False)
        except (ValueError, OSError) as e:
            raise LoaderError(f"{where}: tokens.npy unreadable: {e}") from None
        if tokens.ndim != 1 or tokens.dtype.kind != "u":
            raise LoaderError(f"{where}: tokens.npy must be a 1-D unsigned array, got {tokens.dtype} {tokens.shape}")
        if tokens.size and int(tokens.max()) >= self.vocab_size:
            at = int(np.argmax(tokens >= self.vocab_size))
            raise LoaderError(f"{where}: token id {int(tokens[at])} at position {at} >= vocab size {self.vocab_size}")
        return int(key), tokens

    def close(self) -> None:
        self.file.close()


class PackedLoader:
    """Batches of ``micro_batch_rows`` packed rows for one data-parallel rank, epoch after epoch.

    Tensor- and pipeline-parallel ranks of one replica pass the same ``dp_rank`` and get the same
    batches. ``epochs=None`` streams forever; with a number the stream ends after that many epochs
    (the last row padded, the last batch possibly short), e.g. for one pass over held-out data.
    ``skip_sources``: source indices whose documents are dropped when read (forgotten sources:
    training after unlearning must not feed them again); counted in ``skipped_documents`` and
    ``skipped_tokens`` (tokens after the ``max_document_tokens`` cut).
    """

    def __init__(self, prep_dir: str | Path, seq_length: int, micro_batch_rows: int, *, vocab_size: int,
                 seed: int = 0, dp_rank: int = 0, dp_world: int = 1, verify: bool = True,
                 epochs: int | None = None, pad_token: int = 0, max_document_tokens: int = 0,
                 skip_sources: Iterable[int] = ()) -> None:
        for name, value, low in (("seq_length", seq_length, 2), ("micro_batch_rows", micro_batch_rows, 1),
                                 ("vocab_size", vocab_size, 1), ("dp_world", dp_world, 1), ("seed", seed, 0)):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if not 0 <= dp_rank < dp_world:
            raise ValueError(f"dp_rank must be in [0, {dp_world}), got {dp_rank}")
        if max_document_tokens < 0:
            raise ValueError(f"max_document_tokens must be >= 0 (0: whole documents), got {max_document_tokens}")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be >= 1 or None, got {epochs}")
        self.index = read_shard_index(prep_dir)
        if self.index.documents < dp_world:
            raise LoaderError(f"{self.index.path}: {self.index.documents} documents cannot feed {dp_world} data-parallel ranks")
        self.seq_length, self.micro_batch_rows, self.vocab_size = seq_length, micro_batch_rows, vocab_size
        self.seed, self.dp_rank, self.dp_world, self.verify = seed, dp_rank, dp_world, verify
        self.epochs, self.pad_token, self.max_document_tokens = epochs, pad_token, max_document_tokens
        self._counts = np.array([e.documents for e in self.index.shards], dtype=np.int64)
        self._plan_cache: tuple[int, tuple] | None = None
        self._cursor = (0, 0, 0)  # (epoch, position in this rank's block, token offset): the next row's first token
        self.batches = 0  # batches yielded since the start of training (kept in the state)
        self.empty_documents = 0  # 0-token documents skipped (no labels; prep writes none); counted when read
        self.skip_sources: frozenset[int] = frozenset(int(s) for s in skip_sources)
        # Documents and tokens of skip_sources dropped before the cursor: exact across a resume, because
        # the documents after the cursor are read (and counted) again by the resumed loader.
        self.skipped_documents = 0
        self.skipped_tokens = 0
        self._gen: Iterator[PackedRows] | None = None

    # -- order ---------------------------------------------------------------------------------
    def epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray, int, int]:
        """(shard order, start of each ordered shard in the epoch's document sequence, this rank's
        block [lo, hi)). Costs O(shards): no token is read."""
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            order = np.random.default_rng([self.seed, epoch, 0]).permutation(len(self.index.shards))
            starts = np.concatenate([[0], np.cumsum(self._counts[order])])
            n = int(starts[-1])
            lo, hi = self.dp_rank * n // self.dp_world, (self.dp_rank + 1) * n // self.dp_world
            self._plan_cache = (epoch, (order, starts, lo, hi))
        return self._plan_cache[1]

    def shard_permutation(self, epoch: int, shard: int) -> np.ndarray:
        """The epoch's order of the documents of shard ``shard`` (by position in the shard)."""
        return np.random.default_rng([self.seed, epoch, 1, shard]).permutation(int(self._counts[shard]))

    def _documents(self, epoch: int, pos: int) -> Iterator[tuple[int, int, int, np.ndarray]]:
        """(epoch, position in the rank's block, source, tokens) from the cursor on."""
        while self.epochs is None or epoch < self.epochs:
            order, starts, lo, hi = self.epoch_plan(epoch)
            g = lo + pos
            while g < hi:
                k = int(np.searchsorted(starts, g, side="right")) - 1  # skip whole shards by their counts
                shard = int(order[k])
                picks = self.shard_permutation(epoch, shard)[g - starts[k]: min(hi, starts[k + 1]) - starts[k]]
                reader = _ShardReader(self.index.shards[shard], self.index.path, self.verify, self.vocab_size)
                try:
                    for i in picks.tolist():
                        source, tokens = reader.document(i)
                        yield epoch, g - lo, source, tokens
                        g += 1
                finally:
                    reader.close()
            epoch, pos = epoch + 1, 0

    # -- packing -------------------------------------------------------------------------------
    def _batches(self) -> Iterator[PackedRows]:
        # At the first batch (step 0), before any shard is read, rather than in __init__: data errors reach
        # the trainer from iteration like every other shard error (through PrefetchLoader's thread too).
        check_shard_files(self.index)
        epoch, pos, offset = self._cursor
        # (stream start, epoch, position, first token, documents and tokens skipped before it) per fed document
        fed: deque[tuple[int, int, int, int, int, int]] = deque()
        stream = 0
        skipped_documents, skipped_tokens = self.skipped_documents, self.skipped_tokens

        def documents() -> Iterator[tuple[int, np.ndarray]]:
            nonlocal stream, skipped_documents, skipped_tokens
            skip = offset  # only the cursor's document starts mid-way
            for e, p, source, tokens in self._documents(epoch, pos):
                if self.max_document_tokens:
                    tokens = tokens[: self.max_document_tokens]
                if source in self.skip_sources:
                    # The whole document, even when the cursor points into it: the cursor may come from
                    # a checkpoint written before the source was forgotten.
                    skipped_documents += 1
                    skipped_tokens += int(tokens.size)
                    skip = 0
                    continue
                if tokens.size == 0:
                    self.empty_documents += 1
                    continue
                fed.append((stream, e, p, skip, skipped_documents, skipped_tokens))
                stream += tokens.size - skip
                yield source, tokens[skip:]
                skip = 0

        rows: list[PackedRows] = []
        consumed = 0  # stream position of the next row's first token (rows overlap by one token)
        for row in pack_documents(documents(), self.seq_length, self.pad_token):
            # Row-local document ids: only changes along a row matter (attention_mask.py), and
            # a resumed stream numbers its documents from 0 again.
            row.document_ids -= row.document_ids[:, :1].clone()
            rows.append(row)
            consumed += self.seq_length
            if len(rows) == self.micro_batch_rows:
                while len(fed) > 1 and fed[1][0] <= consumed:
                    fed.popleft()
                start, e, p, first, self.skipped_documents, self.skipped_tokens = fed[0]
                self._cursor = (e, p, first + consumed - start)
                self.batches += 1
                yield PackedRows.stack(rows)
                rows = []
        self._cursor = (self.epochs or 0, 0, 0)
        self.skipped_documents, self.skipped_tokens = skipped_documents, skipped_tokens  # all of them were read
        if rows:
            self.batches += 1
            yield PackedRows.stack(rows)

    def __iter__(self) -> "PackedLoader":
        return self

    def __next__(self) -> PackedRows:
        if self._gen is None:
            self._gen = self._batches()
        return next(self._gen)

    # -- resume --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Where the next batch starts: a small JSON-able dict for the checkpoint."""
        epoch, pos, offset = self._cursor
        return {"format": STATE_FORMAT, "index_sha256": self.index.sha256, "seed": self.seed,
                "max_document_tokens": self.max_document_tokens,
                "dp_rank": self.dp_rank, "dp_world": self.dp_world, "epoch": epoch, "position": pos,
                "offset": offset, "batches": self.batches, "empty_documents": self.empty_documents,
                "skipped_documents": self.skipped_documents, "skipped_tokens": self.skipped_tokens}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (of ``state_dict``): the next batch is the one an uninterrupted loader
        would yield next. seq_length and micro_batch_rows may differ (the stream continues from the same
        token); the data, seed and data-parallel split may not."""
        missing = {"format", "index_sha256", "seed", "dp_rank", "dp_world", "epoch", "position", "offset"} - set(state)
        if missing:
            raise ValueError(f"loader state lacks {sorted(missing)}")
        if state["format"] != STATE_FORMAT:
            raise ValueError(f"loader state format {state['format']}, this loader reads {STATE_FORMAT}")
        for name, mine in (("index_sha256", self.index.sha256), ("seed", self.seed), ("dp_rank", self.dp_rank),
                           ("dp_world", self.dp_world), ("max_document_tokens", self.max_document_tokens)):
            if state.get(name, 0 if name == "max_document_tokens" else None) != mine:
                raise ValueError(f"loader state has {name}={state.get(name)!r}, this loader {mine!r} ({self.index.path})")
        epoch, pos, offset = (int(state[k]) for k in ("epoch", "position", "offset"))
        if epoch < 0 or pos < 0 or offset < 0 or pos > self.epoch_plan(epoch)[3] - self.epoch_plan(epoch)[2]:
            raise ValueError(f"loader state cursor (epoch {epoch}, position {pos}, offset {offset}) is out of range")
        if self._gen is not None:
            self._gen.close()
            self._gen = None
        self._cursor = (epoch, pos, offset)
        self.batches = int(state.get("batches", 0))
        self.empty_documents = int(state.get("empty_documents", 0))
        # Absent in states written before forgotten sources were skipped: nothing was skipped then.
        self.skipped_documents = int(state.get("skipped_documents", 0))
        self.skipped_tokens = int(state.get("skipped_tokens", 0))

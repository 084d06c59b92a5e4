"""A digest for every file of a checkpoint, written at save time and checked before any tensor is read.

``<checkpoint>/digests.json`` lists the sha256 and size of every file under the checkpoint
directory (backbone shards and metadata, sink tables and their manifest, train state, config,
receipts) except itself, and is the last file written before the directory is renamed into place.
A damaged checkpoint (bytes overwritten, a bit flipped, a file truncated or missing) is refused
before anything is loaded, with the file, the expected and the actual digest.

Hashing is split over ranks (file ``i`` of the sorted list goes to rank ``i % world``), so a
multi-GB backbone costs each rank only its share.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from .atomic import atomic_file

DIGESTS = "digests.json"
# Derived data a checkpoint may hold beside what training wrote, each with its own integrity record:
# the nearest-source routing index (`nulls route-index`, built later, rebuilt at will; routing/index.json
# holds its embeddings' sha256). Listed here so that adding it never makes the checkpoint "damaged".
DERIVED_DIRS = ("routing",)
FORMAT = "nulls-checkpoint-digests"
FORMAT_VERSION = 1
_BLOCK = 1 << 24


class CheckpointCorruptError(ValueError):
    """A checkpoint whose files do not match the digests written when it was saved."""


@dataclass(frozen=True)
class FileDigest:
    sha256: str
    bytes: int


def sha256_of(path: Path) -> FileDigest:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
            size += len(block)
    return FileDigest(h.hexdigest(), size)


def checkpoint_files(root: Path) -> list[str]:
    """Relative paths of every file under ``root`` except the digest file and derived data, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == Path(root):
            dirnames[:] = [d for d in dirnames if d not in DERIVED_DIRS]
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if rel != DIGESTS:
                out.append(rel)
    return sorted(out)


def hash_share(root: Path, names: list[str], rank: int = 0, world: int = 1) -> dict[str, dict]:
    """Digests of this rank's share of ``names`` (every ``world``-th file from ``rank``)."""
    return {name: vars(sha256_of(root / name)) for name in names[rank::world]}


def write_digests(root: Path, digests: dict[str, dict]) -> Path:
    missing = sorted(set(checkpoint_files(root)) - set(digests))
    if missing:
        raise ValueError(f"{root}: files without a digest: {missing[:5]}")
    data = {"format": FORMAT, "version": FORMAT_VERSION, "files": dict(sorted(digests.items()))}
    with atomic_file(root / DIGESTS) as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n")
    return root / DIGESTS


def read_digests(root: Path) -> dict[str, dict] | None:
    """The recorded digests, or None for a checkpoint saved before digests were written."""
    path = Path(root) / DIGESTS
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointCorruptError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("files"), dict):
        raise CheckpointCorruptError(f"{path}: not a checkpoint digest file")
    return data["files"]


def verify_share(root: Path, rank: int = 0, world: int = 1) -> list[str]:
    """Problems found in this rank's share of the checkpoint's files (empty: they all match).
    A checkpoint without ``digests.json`` gives one problem saying so."""
    root = Path(root)
    recorded = read_digests(root)
    if recorded is None:
        return [f"{root / DIGESTS}: missing (an unfinished save, or saved before digests were recorded)"] if rank == 0 else []
    problems = []
    names = sorted(recorded)
    if rank == 0:
        extra = sorted(set(checkpoint_files(root)) - set(recorded))
        problems += [f"{root / name}: not listed in {DIGESTS}" for name in extra]
    for name in names[rank::world]:
        path = root / name
        want = recorded[name]
        if not path.is_file():
            problems.append(f"{path}: missing (listed in {DIGESTS})")
            continue
        size = path.stat().st_size
        if size != want["bytes"]:
            problems.append(f"{path}: {size} bytes, {want['bytes']} when saved (truncated or overwritten)")
            continue
        got = sha256_of(path)
        if got.sha256 != want["sha256"]:
            problems.append(f"{path}: sha256 {got.sha256}, expected {want['sha256']}")
    return problems


def nearest_good(candidates: Iterable[Path], verify: Callable[[Path], list[str]] | None = None) -> Path | None:
    """The first of ``candidates`` (newest first) whose files all match their digests."""
    check = verify or verify_share
    for path in candidates:
        try:
            if not check(path):
                return path
        except (OSError, ValueError):
            continue
    return None

"""Crash-safe checkpoint directories under one root.

A root holds ``step-000001234`` directories and a ``latest`` text file naming one
of them. ``nulls unlearn`` writes later *versions* of a step beside it,
``step-000001234-unlearn-001`` and so on; they sort after their step. Every write goes to a hidden temp name ``.<name>.tmp-<pid>`` beside its
target, is fsynced, and is renamed into place with ``os.replace``; a process
killed at any point leaves either the old state or the new one, plus at worst
temp debris that :func:`clean_partial` removes.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

__all__ = [
    "atomic_dir", "atomic_file", "checkpoint_name", "checkpoint_step", "checkpoint_version", "clean_partial",
    "fsync_dir", "list_checkpoints", "prune", "read_latest", "roll_back", "update_latest", "version_name", "LATEST",
]

LATEST = "latest"
_STEP_RE = re.compile(r"^step-(\d+)(?:-unlearn-(\d+))?$")
_TMP_RE = re.compile(r"^\..+\.tmp-(\d+)$")


def checkpoint_name(step: int) -> str:
    """``step-000001234``: zero padded so a plain ``ls`` lists checkpoints in order."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step-{step:09d}"


def checkpoint_step(name: str) -> int | None:
    """The step encoded in a checkpoint name, or None for anything else."""
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


def checkpoint_version(name: str) -> tuple[int, int] | None:
    """(step, unlearning version) of a checkpoint name (version 0: as trained), or None."""
    m = _STEP_RE.match(name)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def version_name(step: int, version: int) -> str:
    """``step-000001234-unlearn-007``: version ``version`` of step ``step`` (0: the trained one)."""
    if version < 0:
        raise ValueError(f"version must be >= 0, got {version}")
    return checkpoint_name(step) if version == 0 else f"{checkpoint_name(step)}-unlearn-{version:03d}"


def _temp_path(final: Path) -> Path:
    return final.parent / f".{final.name}.tmp-{os.getpid()}"


def fsync_dir(path: Path) -> None:
    """fsync a directory so the names created/renamed in it survive a power loss (a file: its data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_fsync_file = fsync_dir  # the same call makes a file's data durable


def _fsync_tree(root: Path) -> None:
    # Bottom-up so every file's data is durable before the names pointing at it.
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for f in filenames:
            _fsync_file(Path(dirpath) / f)
        fsync_dir(Path(dirpath))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_file(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``final_path``; on success fsync it and rename it into place."""
    final = Path(final_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(final)
    _remove(tmp)
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"atomic_file: nothing was written to {tmp} (for {final})")
        _fsync_file(tmp)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory; on success fsync everything in it and rename it to ``final_path``.

    ``final_path`` must not exist yet: renaming over a non-empty directory cannot
    be atomic, and a checkpoint name (its step) is written once.
    """
    final = Path(final_path)
    if final.exists():
        raise FileExistsError(f"checkpoint directory {final} already exists; refusing to overwrite it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(final)
    _remove(tmp)  # debris of an earlier process that had our pid
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        _remove(tmp)
        raise


def roll_back(root: str | os.PathLike, name: str, stamp: str) -> list[Path]:
    """Make checkpoint ``name`` the latest: every newer checkpoint moves, never deleted, into
    ``root/rolled-back-<stamp>/`` (so the next save cannot collide with one), then ``latest`` names it.
    Returns the moved directories (their new paths)."""
    root = Path(root)
    target = root / name
    order = [p for _, p in list_checkpoints(root)]
    if target not in order:
        raise FileNotFoundError(f"{target}: no such checkpoint (have: {', '.join(p.name for p in order) or 'none'})")
    newer = order[order.index(target) + 1:]
    moved = []
    if newer:
        aside = root / f"rolled-back-{stamp}"
        aside.mkdir()
        for path in newer:
            os.replace(path, aside / path.name)
            moved.append(aside / path.name)
        fsync_dir(aside)
        fsync_dir(root)
    update_latest(root, name)
    return moved


def update_latest(root: str | os.PathLike, name: str) -> None:
    """Point ``root/latest`` at checkpoint ``name`` (which must already exist in ``root``)."""
    root = Path(root)
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"latest: invalid checkpoint name {name!r}")
    if not (root / name).is_dir():
        raise FileNotFoundError(f"latest: checkpoint {root / name} does not exist")
    with atomic_file(root / LATEST) as tmp:
        tmp.write_text(name + "\n")


def read_latest(root: str | os.PathLike) -> Path | None:
    """The checkpoint ``root/latest`` names, or None when there is no ``latest`` yet.

    A ``latest`` naming a missing directory is an error, not None: silently
    restarting from scratch would throw the run away.
    """
    path = Path(root) / LATEST
    try:
        name = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a checkpoint name (binary content); write the name of a checkpoint "
                         f"of {root} into it, or resume with --resume-from STEP") from None
    if not name or "/" in name or checkpoint_version(name) is None:
        raise ValueError(f"{path}: invalid checkpoint name {name[:80]!r}; write the name of a checkpoint of {root} "
                         "into it, or resume with --resume-from STEP")
    target = Path(root) / name
    if not target.is_dir():
        raise FileNotFoundError(f"{path} names {name!r}, but {target} does not exist")
    return target


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every ``step-N`` directory (and unlearned version of one) in ``root``, oldest
    first; versions of a step follow it in version order."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        sv = checkpoint_version(entry.name)
        if sv is not None and entry.is_dir():
            found.append((sv, entry))
    return [(sv[0], path) for sv, path in sorted(found)]


def prune(root: str | os.PathLike, keep_last: int) -> list[Path]:
    """Remove all but the newest ``keep_last`` checkpoints, never the one ``latest`` names.

    Returns the removed directories. Each is first renamed to a temp name, so a
    kill mid-removal leaves debris for :func:`clean_partial`, not a half checkpoint.
    """
    if keep_last < 1:
        raise ValueError(f"prune: keep_last must be >= 1, got {keep_last}")
    root = Path(root)
    latest = read_latest(root)
    keep = {p for _, p in list_checkpoints(root)[-keep_last:]}
    if latest is not None:
        keep.add(latest)
    removed = []
    for _, path in list_checkpoints(root):
        if path in keep:
            continue
        doomed = _temp_path(path)
        os.replace(path, doomed)
        shutil.rmtree(doomed)
        removed.append(path)
    if removed:
        fsync_dir(root)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own debris: we are not inside a save while cleaning
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_partial(root: str | os.PathLike) -> list[Path]:
    """Remove temp files/dirs left in ``root`` by killed saves; returns what was removed.

    Debris whose pid is a live process on this host is left alone, in case a save
    is running. On a shared file system, call it from one rank before any save.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    removed = []
    for entry in sorted(root.iterdir()):
        m = _TMP_RE.match(entry.name)
        if m and not _pid_alive(int(m.group(1))):
            _remove(entry)
            removed.append(entry)
    return removed

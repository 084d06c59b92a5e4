"""Write the unlearned checkpoint: a new version in which the sources' rows are gone.

``erase``: every row of the sources, in every layer and pool shard, is set to exactly zero in
the weight and in every per-row optimizer tensor (AdamW moments, fp32 master weights) and is
flagged disabled; the sources join ``disabled_sources``. ``suppress``: the rows are only flagged
(reversible, the weights keep them); ``restore`` lifts a suppression (rows that other off
sources still need stay flagged).

The new version is written under a temporary name beside its final one and renamed into place
(``checkpoint.atomic.atomic_dir``): a SIGKILL at any moment leaves the old version untouched
and either no new version or a complete one, never a half-zeroed one. Files that do not change
(the backbone, untouched shards, the config) are hard-linked, not copied (copied when the
destination is on another file system). ``latest`` moves to the new version only after it is in
place; a run killed in between is completed by the next ``nulls unlearn`` on that root.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
from ..checkpoint.atomic import atomic_dir, checkpoint_version, clean_partial, read_latest, update_latest
from ..checkpoint.digests import DIGESTS, checkpoint_files, read_digests, sha256_of, write_digests
from ..checkpoint.sinks import (MANIFEST, OPTIM_PREFIX, SINKS_DIR, SinkCheckpointError, SourceState, shard_file_name,
                                write_sink_manifest)
from .checkpoint_view import RECEIPTS_DIR, CheckpointView, open_checkpoint
from .collateral import rows_of
from .st_layout import tensor_spans

ACTIONS = ("erase", "suppress", "restore")
_WRITERS = 2
ROUTING_DIR = "routing"  # nulls_megatron.routing's index folder (not imported: unlearning needs no embedder)
_TMP_RE = re.compile(r"^\..+\.tmp-\d+$")  # checkpoint.atomic's temp names
Event = Callable[[str, Path], None]


@dataclass
class WriteResult:
    path: Path
    files: dict[str, dict[str, str]]  # "sinks/<file>": {"before": sha, "after": sha}
    rows: dict[str, dict[str, list[int]]]  # layer-LLL -> shard-EEE -> rows (global pool rows)
    linked: int = 0
    copied: int = 0
    latest_updated: bool = False
    notes: list[str] = field(default_factory=list)


def new_state(state: SourceState, action: str, sources: list[int]) -> SourceState:
    """The source state after ``action`` on ``sources`` (receipts are appended by the caller)."""
    disabled, suppressed = list(state.disabled_sources), set(state.suppressed_sources)
    if action == "erase":
        disabled += [s for s in sources if s not in set(disabled)]
        suppressed -= set(sources)
    elif action == "suppress":
        suppressed |= set(sources)
    elif action == "restore":
        suppressed -= set(sources)
    else:
        raise ValueError(f"unknown action {action!r} (one of {', '.join(ACTIONS)})")
    return replace(state, disabled_sources=disabled, suppressed_sources=sorted(suppressed))


def changed_rows(view: CheckpointView, action: str, sources: list[int]) -> dict[int, np.ndarray]:
    """Per layer, the rows whose file content changes: the sources' rows (erase, suppress) or the
    rows whose suppression lifts (restore)."""
    a, out = view.assignment, {}
    for layer in view.layers:
        rows = rows_of(a, sources, layer)
        if action == "restore":
            still_off = rows_of(a, new_state(view.state, action, sources).off_sources(), layer)
            rows = np.setdiff1d(rows, still_off)
        out[layer] = rows
    return out


def _link_or_copy(src: Path, dst: Path, result: WriteResult) -> None:
    try:
        os.link(src, dst)
        result.linked += 1
    except OSError:
        shutil.copy2(src, dst)
        result.copied += 1


def _link_tree(src: Path, dst: Path, skip: set[str], result: WriteResult) -> None:
    for entry in sorted(src.iterdir()):
        if entry.name in skip or _TMP_RE.match(entry.name):  # never dot-files in general: DCP's .metadata is one
            continue
        if entry.is_dir():
            (dst / entry.name).mkdir()
            _link_tree(entry, dst / entry.name, set(), result)
        else:
            _link_or_copy(entry, dst / entry.name, result)


def _read_into_bytearray(path: Path) -> bytearray:
    """The file's bytes in a buffer that can be edited in place (no extra copy of a large file)."""
    data = bytearray(path.stat().st_size)
    with open(path, "rb") as f:
        n = f.readinto(data)
    return data[:n] if n != len(data) else data


def _edit_shard(out: bytearray, action: str, rows: np.ndarray, off_rows: np.ndarray, where: Path) -> bytearray:
    """One layer/shard file's bytes edited in place in its safetensors layout (rows local to the
    shard): the header, and so every byte outside the edited rows, stays as it was."""
    spans = tensor_spans(out, where)
    if action == "erase":
        for name, span in spans.items():
            if name == "weight" or name.startswith(OPTIM_PREFIX):
                size = span.row_bytes
                for r in rows.tolist():
                    out[span.start + r * size:span.start + (r + 1) * size] = bytes(size)
    flags = spans.get("disabled")
    if flags is None or flags.dtype != "U8" or len(flags.shape) != 1:
        raise SinkCheckpointError(f"{where}: 'disabled' must be a uint8 vector, got {flags}")
    values = np.zeros(flags.shape[0], dtype=np.uint8)
    values[off_rows] = 1
    out[flags.start:flags.start + len(values)] = values.tobytes()
    return out


def write_version(view: CheckpointView, action: str, sources: list[int], receipt_writer: Callable[[WriteResult, Path], dict],
                  out: Path | None = None, on_event: Event | None = None) -> WriteResult:
    """Write the new version (``out``, or the next version beside ``view``); returns what changed.

    ``receipt_writer(result, tmp_dir)`` writes the receipt into the temp directory once every
    sink file is written and returns its manifest entry (``{"name", "sha256", "action"}``).
    """
    event = on_event or (lambda stage, path: None)
    final = Path(out) if out is not None else view.next_version_path()
    if out is None:
        for debris in clean_partial(view.root):
            event("cleaned", debris)
    a = view.assignment
    size = a.shard_size
    state = new_state(view.state, action, sources)
    changes = changed_rows(view, action, sources)
    result = WriteResult(final, {}, {})
    with atomic_dir(final) as tmp:
        # The routing index embeds every source's title (or opening text): an erased source's row must not
        # ship in the new version, so an erasure leaves the index behind (`nulls route-index` rebuilds it,
        # with erased sources' rows zero); a suppression keeps it.
        skip = {SINKS_DIR, DIGESTS} | ({ROUTING_DIR} if action == "erase" else set())
        if action == "erase" and (view.path / ROUTING_DIR).is_dir():
            result.notes.append(f"the routing index ({ROUTING_DIR}/) was not carried over: it embeds the erased "
                                f"sources' text; rebuild it with `nulls route-index {final}`")
        _link_tree(view.path, tmp, skip, result)
        (tmp / SINKS_DIR).mkdir()
        digests = view.file_digests()
        jobs = []
        for layer in view.layers:
            off_rows = rows_of(a, state.off_sources(), layer)
            rows = changes[layer]
            touched = set((rows // size).tolist())
            for shard in range(a.n_shards):
                lo = shard * size
                jobs.append((layer, shard, shard in touched, rows[(rows >= lo) & (rows < lo + size)] - lo,
                             off_rows[(off_rows >= lo) & (off_rows < lo + size)] - lo))

        def one_file(job: tuple) -> tuple[str, str | None]:
            layer, shard, touched, local_rows, local_off = job
            name = shard_file_name(layer, shard)
            src, dst = view.sinks_dir / name, tmp / SINKS_DIR / name
            # Every file is checked against its digest before it is used: a damaged checkpoint is
            # refused and the temp directory removed, so nothing of this run stays behind.
            raw = _read_into_bytearray(src) if src.is_file() else None
            if raw is None or (got := hashlib.sha256(raw).hexdigest()) != digests[name]:
                what = "missing" if raw is None else f"sha256 {got} does not match the manifest's {digests[name]}"
                raise SinkCheckpointError(f"{src}: {what}; the checkpoint is damaged, refusing to unlearn "
                                          "(nothing was written)")
            if not touched:
                return name, None
            data = _edit_shard(raw, action, local_rows, local_off, src)
            with open(dst, "wb") as f:  # inside the temp directory: atomic_dir renames it whole
                f.write(data)
                os.fsync(f.fileno())
            event("file", dst)
            return name, (hashlib.sha256(data).hexdigest(), len(data))

        written: dict[str, dict] = {}
        # Hashing, writing and fsync release the GIL: two threads keep both cores and the disk busy.
        with ThreadPoolExecutor(max_workers=_WRITERS) as pool:
            done = list(pool.map(one_file, jobs))
        for (layer, shard, touched, local_rows, _), (name, after) in zip(jobs, done):
            src, dst = view.sinks_dir / name, tmp / SINKS_DIR / name
            if after is None:
                _link_or_copy(src, dst, result)
                continue
            after, n_bytes = after
            result.files[f"{SINKS_DIR}/{name}"] = {"before": digests[name], "after": after}
            written[f"{SINKS_DIR}/{name}"] = {"sha256": after, "bytes": n_bytes}
            result.rows.setdefault(f"layer-{layer:03d}", {})[f"shard-{shard:03d}"] = (local_rows + shard * size).tolist()
            digests[name] = after
        (tmp / RECEIPTS_DIR).mkdir(exist_ok=True)
        entry = receipt_writer(result, tmp)
        state.receipts = list(state.receipts) + [entry]
        m = view.manifest
        part = {"common": {"assignment": m["assignment"], "hidden_size": m["hidden_size"], "dtype": m["dtype"]},
                "layers": view.layers, "optimizer_tensors": m.get("optimizer_tensors", []), "files": digests}
        write_sink_manifest(tmp, [part], state)
        _write_digests(view, tmp, {f"{SINKS_DIR}/{MANIFEST}", entry["name"]}, written)
        event("written", tmp)
    event("renamed", final)
    if out is None and view.is_latest():
        update_latest(view.root, final.name)
        result.latest_updated = True
        event("latest", final)
    return result


def _write_digests(view: CheckpointView, tmp: Path, changed: set[str], written: dict[str, dict]) -> None:
    """``digests.json`` of the new version: the old digests of every linked (unchanged) file, the ones
    computed while writing the rewritten sink files, and fresh ones of the small files this run wrote
    (a checkpoint saved before digests existed gets all of them fresh)."""
    old = read_digests(view.path) or {}
    digests = {}
    for name in checkpoint_files(tmp):
        if name in written:
            digests[name] = written[name]
        elif name in old and name not in changed:
            digests[name] = old[name]
        else:
            digests[name] = vars(sha256_of(tmp / name))
    write_digests(tmp, digests)


def finish_interrupted(root: Path) -> Path | None:
    """If an unlearning was killed after its new version was renamed into place but before ``latest``
    moved, move ``latest`` now (to the newest complete version of the same step descending from the
    one ``latest`` names). Returns the version ``latest`` now names when it moved."""
    try:
        latest = read_latest(root)
    except (OSError, ValueError):
        return None
    if latest is None or checkpoint_version(latest.name) is None:
        return None
    step, version = checkpoint_version(latest.name)
    base = open_checkpoint(latest).state.receipts
    newer = sorted((v, p) for p in root.iterdir()
                   if (sv := checkpoint_version(p.name)) and sv[0] == step and (v := sv[1]) > version and p.is_dir())
    for _, path in reversed(newer):
        try:
            receipts = open_checkpoint(path).state.receipts
        except (OSError, ValueError):
            continue
        if receipts[:len(base)] == base and len(receipts) > len(base):
            update_latest(root, path.name)
            return path
    return None

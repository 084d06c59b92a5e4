"""`nulls verify-unlearned`: check a checkpoint against a receipt (or a title) from the files alone.

Checks, each failure naming the file, layer, row and what is wrong:
1. every sink file's sha256 matches the sink manifest (the files are the ones the manifest describes);
2. the sources are in the manifest's disabled set (``suppressed`` for a suppression receipt);
3. every row of the sources, recomputed from the assignment in every layer and shard, is exactly
   zero in the weight and in every optimizer tensor (erasure) and flagged disabled;
4. with a receipt: its rows equal the recomputed ones, and its sha256 is among the manifest's
   receipts (the checkpoint descends from the version the receipt describes). A checkpoint trained
   further after the deletion passes too: its digests differ from the receipt's, its rows are zero.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..checkpoint.sinks import OPTIM_PREFIX, shard_file_name
from .checkpoint_view import CheckpointView
from .collateral import rows_of
from .st_layout import tensor_spans

_SHOWN_ROWS = 5


@dataclass
class Verification:
    checkpoint: Path
    sources: list[int]
    action: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rows_checked: int = 0
    files_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(view: CheckpointView, sources: list[int], action: str = "erase", receipt: dict | None = None,
           receipt_sha256: str | None = None) -> Verification:
    result = Verification(view.path, sorted(sources), action)
    problems = result.problems
    contents: dict[str, bytes] = {}
    a = view.assignment
    size = a.shard_size
    wanted = {layer: rows_of(a, sources, layer) for layer in view.layers}
    for name, want in view.file_digests().items():
        path = view.sinks_dir / name
        result.files_checked += 1
        if not path.is_file():
            problems.append(f"{path}: missing (listed in the sink manifest)")
            continue
        raw = path.read_bytes()
        if (got := hashlib.sha256(raw).hexdigest()) != want:
            problems.append(f"{path}: sha256 {got} does not match the sink manifest's {want}")
        else:
            contents[name] = raw  # tensors of a file that does not match its digest are never read
    if problems:
        return result
    listed = set(view.state.disabled_sources if action == "erase" else view.state.suppressed_sources)
    missing = [s for s in sources if s not in listed]
    if missing:
        which = "disabled_sources" if action == "erase" else "suppressed_sources"
        problems.append(f"{view.sinks_dir / 'manifest.json'}: sources {missing} are not in {which}")
    expected_rows: dict[str, dict[str, list[int]]] = {}
    for layer in view.layers:
        rows = wanted[layer]
        for shard in range(a.n_shards):
            lo = shard * size
            mine = rows[(rows >= lo) & (rows < lo + size)]
            if not len(mine):
                continue
            expected_rows.setdefault(f"layer-{layer:03d}", {})[f"shard-{shard:03d}"] = mine.tolist()
            name = shard_file_name(layer, shard)
            path, raw = view.sinks_dir / name, contents[name]
            spans = tensor_spans(raw, path)
            local = mine - lo
            flags = spans["disabled"].rows(raw, local).ravel()
            _report_rows(problems, path, layer, mine[flags == 0], len(mine), "not flagged disabled")
            if action == "erase":
                for tensor in sorted(spans):
                    if tensor == "weight" or tensor.startswith(OPTIM_PREFIX):
                        values = spans[tensor].rows(raw, local)
                        _report_rows(problems, path, layer, mine[(values != 0).any(1)], len(mine), f"{tensor} is not zero")
            result.rows_checked += len(mine)
    if receipt is not None:
        _check_receipt(view, receipt, receipt_sha256, expected_rows, result)
    return result


def _report_rows(problems: list[str], path: Path, layer: int, bad: np.ndarray, total: int, what: str) -> None:
    if len(bad):
        shown = ", ".join(str(r) for r in bad[:_SHOWN_ROWS].tolist()) + (", ..." if len(bad) > _SHOWN_ROWS else "")
        problems.append(f"{path}: layer {layer}: {len(bad)} of {total} rows {what} (rows {shown})")


def _check_receipt(view: CheckpointView, receipt: dict, receipt_sha256: str | None, expected_rows: dict,
                   result: Verification) -> None:
    if receipt.get("assignment") != view.manifest["assignment"]:
        result.problems.append(f"receipt: assignment {receipt.get('assignment')} differs from the checkpoint's "
                               f"{view.manifest['assignment']}")
    listed_rows = receipt.get("rows", {})
    if receipt.get("action") != "restore" and listed_rows != expected_rows:
        result.problems.append("receipt: the rows it lists differ from the rows the checkpoint's assignment gives "
                               "its sources (a receipt of another checkpoint, or edited)")
    if receipt_sha256 is not None:
        history = {r["sha256"] for r in view.state.receipts}
        if receipt_sha256 not in history:
            result.problems.append(f"receipt sha256 {receipt_sha256} is not among this checkpoint's receipts "
                                   "(the checkpoint does not descend from the version the receipt describes)")
    after = {name: d["after"] for name, d in receipt.get("files", {}).items()}
    digests = {f"sinks/{n}": d for n, d in view.file_digests().items()}
    if after and all(digests.get(n) == d for n, d in after.items()):
        result.notes.append("the files the receipt changed still have the digests it recorded")
    elif after:
        result.notes.append("files differ from the receipt's digests (a later version, e.g. trained further); "
                            "the rows were re-verified in the files themselves")


def format_verification(v: Verification) -> str:
    head = "OK" if v.ok else "FAILED"
    lines = [f"verify-unlearned {v.checkpoint}: {head}: {len(v.sources)} source(s), {v.rows_checked} rows in "
             f"{v.files_checked} files ({'erased' if v.action == 'erase' else v.action})"]
    lines += [f"  problem: {p}" for p in v.problems[:50]]
    if len(v.problems) > 50:
        lines.append(f"  ... and {len(v.problems) - 50} more problems")
    lines += [f"  note: {n}" for n in v.notes]
    return "\n".join(lines)


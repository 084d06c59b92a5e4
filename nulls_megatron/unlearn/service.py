"""From a deletion request to a new checkpoint version and its receipt (and the checks after).

The steps, in order, and nothing is written before the last of the checks:
1. open the checkpoint, finish an interrupted unlearning of the same root, verify every sink file's digest;
2. open the sources manifest the checkpoint was trained on (digest checked) and resolve every request;
3. sort the sources into those to act on and those already done (idempotence: nothing left, nothing written);
4. compute and show the collateral (a table, and JSON with ``--json``);
5. unless ``dry_run``: write the new version with its receipt (apply.write_version), move ``latest``,
   then, with ``purge_data``, rewrite the prepared data without the sources' documents.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..checkpoint.atomic import atomic_file, list_checkpoints
from ..checkpoint.provenance import sources_manifest_dir
from .apply import Event, WriteResult, finish_interrupted, write_version
from .checkpoint_view import CheckpointView, open_checkpoint
from .collateral import compute_collateral, format_collateral
from .receipt import build_receipt, read_receipt, write_receipt
from .requests import Request, ResolvedSource, SourceResolver
from .sink_index import CACHE_MIN_SOURCES, SinkRows
from .verify import Verification, verify

Print = Callable[[str], None]


@dataclass
class UnlearnOutcome:
    checkpoint: Path
    action: str
    sources: list[ResolvedSource]
    skipped: list[dict]
    report: list[dict]
    collateral: dict | None = None
    written: WriteResult | None = None
    receipt_path: Path | None = None
    receipt_sha256: str | None = None
    purge: dict | None = None
    warnings: list[str] = field(default_factory=list)


def _sort_out(view: CheckpointView, action: str, sources: list[ResolvedSource]) -> tuple[list[ResolvedSource], list[dict]]:
    erased, suppressed = set(view.state.disabled_sources), set(view.state.suppressed_sources)
    act, skipped = [], []

    def skip(s: ResolvedSource, reason: str) -> None:
        skipped.append({"index": s.index, "title": s.title, "reason": reason})

    for s in sources:
        if action == "erase" and s.index in erased:
            skip(s, "already forgotten (erased)")
        elif action == "suppress" and s.index in erased:
            skip(s, "already erased (stronger than suppression)")
        elif action == "suppress" and s.index in suppressed:
            skip(s, "already suppressed")
        elif action == "restore" and s.index in erased:
            raise ValueError(f"source {s.index} ({s.title!r}) was erased: its weights are zero and cannot be restored")
        elif action == "restore" and s.index not in suppressed:
            skip(s, "not suppressed")
        else:
            act.append(s)
    return act, skipped


def run_unlearn(checkpoint: str | Path, requests: list[Request], *, action: str = "erase", out: str | Path | None = None,
                dry_run: bool = False, manifest: str | Path | None = None, purge_data: str | Path | None = None,
                json_path: str | Path | None = None, argv: list[str] | None = None, say: Print = print,
                on_event: Event | None = None, cache_min_sources: int = CACHE_MIN_SOURCES,
                show_collateral: bool = True) -> UnlearnOutcome:
    view = open_checkpoint(checkpoint)
    if view.is_latest() and out is None:
        moved = finish_interrupted(view.root)
        if moved is not None:
            say(f"completed an interrupted unlearning: {view.root / 'latest'} now names {moved.name}")
            view = open_checkpoint(moved)
    prep = sources_manifest_dir(view.state.sources_manifest, manifest, str(view.path))
    resolver = SourceResolver(prep)
    resolved, report = resolver.resolve(requests)
    act, skipped = _sort_out(view, action, resolved)
    outcome = UnlearnOutcome(view.path, action, act, skipped, report)
    for item in skipped:
        say(f"source {item['index']} ({item['title']!r}): {item['reason']}; nothing to do for it")
    if not act:
        say(f"nothing changed: every requested source is already {'forgotten' if action != 'restore' else 'restored'} "
            f"in {view.path}")
        _write_json(json_path, outcome)
        return outcome
    if action != "restore" and show_collateral:
        rows = SinkRows(view.assignment, len(resolver), cache_root=view.root, cache_min_sources=cache_min_sources,
                        progress=True)
        outcome.collateral = compute_collateral(view.assignment, view.layers, len(resolver), [s.index for s in act],
                                                view.state.off_sources(), rows)
        say(format_collateral(outcome.collateral))
    if dry_run:
        view.verify_sink_files()  # a real run checks every file as it reads it
        say("dry run: nothing was written")
        _write_json(json_path, outcome)
        return outcome

    def receipt_writer(result: WriteResult, tmp: Path) -> dict:
        receipt = build_receipt(
            action=action, request={"argv": argv or [], "lines": report}, sources=[s.to_json() for s in act],
            skipped=skipped, checkpoint_from=view.path, checkpoint_to=result.path, step=view.step(),
            assignment=view.manifest["assignment"], rows=result.rows, files=result.files,
            sources_manifest=view.state.sources_manifest, collateral=outcome.collateral)
        entry = write_receipt(tmp, receipt, len(view.state.receipts) + 1)
        outcome.receipt_path, outcome.receipt_sha256 = result.path / entry["name"], entry["sha256"]
        return entry

    outcome.written = write_version(view, action, [s.index for s in act], receipt_writer,
                                    out=Path(out) if out is not None else None, on_event=on_event)
    w = outcome.written
    verb = {"erase": "erased", "suppress": "suppressed (weights kept)", "restore": "restored"}[action]
    say(f"{verb} {len(act)} source(s): new checkpoint {w.path} ({len(w.files)} sink files rewritten, "
        f"{w.linked} files hard-linked, {w.copied} copied)" + ("; latest now names it" if w.latest_updated else ""))
    say(f"receipt {outcome.receipt_path}")
    say(f"receipt sha256 {outcome.receipt_sha256}")
    for note in w.notes:
        say(f"note: {note}")
    if action == "erase":
        outcome.warnings = _older_holders(view, w.path, [s.index for s in act])
        for warning in outcome.warnings:
            say(f"warning: {warning}")
    if purge_data is not None:
        from .purge import purge_prepared_data

        outcome.purge = purge_prepared_data(Path(purge_data), [s.index for s in act], outcome.receipt_sha256)
        say(f"purged {outcome.purge['documents']} document(s) ({outcome.purge['tokens']:,} tokens) from {purge_data}")
    _write_json(json_path, outcome)
    return outcome


def _older_holders(view: CheckpointView, new: Path, sources: list[int]) -> list[str]:
    """Other checkpoints of the root that still hold the erased rows (deleting them completes the deletion)."""
    holders = []
    for _, path in list_checkpoints(view.root):
        if path.resolve() == new.resolve():
            continue
        try:
            erased = set(open_checkpoint(path).state.disabled_sources)
        except (OSError, ValueError):
            continue
        if not set(sources) <= erased:
            holders.append(path.name)
    if not holders:
        return []
    return [f"{len(holders)} other checkpoint(s) in {view.root} still hold these rows: {', '.join(holders)}; "
            "delete them to complete the deletion"]


def _write_json(path: str | Path | None, outcome: UnlearnOutcome) -> None:
    if path is None:
        return
    data = {"checkpoint": str(outcome.checkpoint), "action": outcome.action,
            "sources": [s.to_json() for s in outcome.sources], "skipped": outcome.skipped, "requests": outcome.report,
            "collateral": outcome.collateral, "written": str(outcome.written.path) if outcome.written else None,
            "receipt": str(outcome.receipt_path) if outcome.receipt_path else None,
            "receipt_sha256": outcome.receipt_sha256, "purge": outcome.purge, "warnings": outcome.warnings}
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def run_verify(checkpoint: str | Path, receipt: str | Path | None = None, requests: list[Request] | None = None,
               manifest: str | Path | None = None) -> Verification:
    view = open_checkpoint(checkpoint)
    if receipt is not None:
        data, digest = read_receipt(receipt)
        sources = [int(s["index"]) for s in data["sources"]]
        action = "erase" if data["action"] == "erase" else "suppress"
        if data["action"] == "restore":
            raise ValueError(f"{receipt}: a restore receipt lifts a suppression; there is nothing forgotten to verify")
        return verify(view, sources, action, data, digest)
    if not requests:
        raise ValueError("verify-unlearned needs --receipt R or the sources (--title, --source-index, ...)")
    prep = sources_manifest_dir(view.state.sources_manifest, manifest, str(view.path))
    resolved, _ = SourceResolver(prep).resolve(requests)
    return verify(view, [s.index for s in resolved])

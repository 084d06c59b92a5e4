"""The unlearning receipt: what was asked, what was done, and the digests that prove it.

A JSON file in the new version's ``receipts/`` (``NNN-<action>.json``), whose sha256 is printed
and recorded in the sink manifest's ``receipts``, so that every later version (also after more
training) names the receipts of its history. Anyone can check it against the files with
``nulls verify-unlearned CKPT --receipt R``.
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from ..checkpoint.sinks import write_bytes_atomic
from .checkpoint_view import RECEIPTS_DIR

FORMAT = "nulls-unlearning-receipt"
FORMAT_VERSION = 1

STATEMENTS = {
    "erase": "The listed rows were set to exactly zero in the stored weights and in every per-row optimizer "
             "tensor of every listed file, and flagged disabled. This proves that the sources' sink rows are "
             "gone; it does not prove that nothing of the sources is remembered elsewhere (the shared weights "
             "may keep some of it: measure with `nulls eval`).",
    "suppress": "SUPPRESSED ONLY: the weights were NOT erased. The listed rows were flagged disabled, so the "
                "model does not use them, but they are still stored in the checkpoint and anyone holding the "
                "files can switch them back on. Reversible with `nulls unlearn --restore`.",
    "restore": "The listed sources' suppression was lifted: their rows (except rows other off sources still "
               "need) are enabled again. Their weights had been kept.",
}


def package_version() -> str:
    try:
        return metadata.version("nulls-megatron")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_receipt(*, action: str, request: dict, sources: list[dict], skipped: list[dict], checkpoint_from: Path,
                  checkpoint_to: Path, step: int | None, assignment: dict, rows: dict, files: dict,
                  sources_manifest: dict | None, collateral: dict | None) -> dict:
    return {
        "format": FORMAT, "version": FORMAT_VERSION,
        "action": action, "weights_erased": action == "erase", "statement": STATEMENTS[action],
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "package_version": package_version(),
        "request": request,
        "sources": sources,
        "skipped": skipped,
        "checkpoint": {"from": str(checkpoint_from.resolve()), "to": str(checkpoint_to.resolve()), "step": step},
        "assignment": assignment,
        "sources_manifest": sources_manifest,
        "rows": rows,
        "files": files,
        "collateral": collateral,
    }


def write_receipt(version_dir: Path, receipt: dict, number: int) -> dict:
    """Write the receipt into ``version_dir/receipts``; returns the manifest entry with its sha256."""
    name = f"{number:03d}-{receipt['action']}.json"
    data = (json.dumps(receipt, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
    write_bytes_atomic(version_dir / RECEIPTS_DIR / name, data)
    return {"name": f"{RECEIPTS_DIR}/{name}", "sha256": hashlib.sha256(data).hexdigest(), "action": receipt["action"]}


def read_receipt(path: str | Path) -> tuple[dict, str]:
    """(receipt, sha256 of its bytes); errors name the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: receipt not found") from None
    try:
        receipt = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a JSON receipt ({e})") from None
    if not isinstance(receipt, dict) or receipt.get("format") != FORMAT:
        raise ValueError(f"{path}: not an unlearning receipt (format {receipt.get('format') if isinstance(receipt, dict) else None!r})")
    if receipt.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: receipt version {receipt.get('version')!r}, this code reads {FORMAT_VERSION}")
    return receipt, hashlib.sha256(data).hexdigest()

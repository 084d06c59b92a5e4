"""`nulls unlearn --purge-data PREP_DIR`: the prepared data without the forgotten sources' documents.

The shards holding their documents are rewritten without them, their rows in ``manifest.parquet``
are marked absent (``present`` false, no shard, 0 tokens; index, key and title stay, so a later
request for the same title still resolves and says it is forgotten), and ``shard_index.json`` gets
the new sizes and digests. ``manifest_lineage.json`` records the manifest digests it replaced, so
checkpoints trained on the earlier manifest still open it (``checkpoint.provenance``).

All new files are first written under staging names; a journal listing the renames is written
atomically; then the renames run and the journal is removed. A run killed before the journal
exists changed nothing; one killed after it is rolled forward by the next purge of the folder.
A run resumed on the purged data starts a new data order: the loader refuses the old cursor
because the shard index changed (docs/unlearning.md).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.manifest import MANIFEST_NAME, SCHEMA
from data_prep.shards import SHARD_DIR, SHARD_INDEX_NAME, read_shard, write_shard

from ..checkpoint.atomic import atomic_file, fsync_dir

JOURNAL = ".purge-journal.json"
STAGING = ".purge-staging"
from ..checkpoint.provenance import LINEAGE


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def roll_forward(prep_dir: Path) -> bool:
    """Finish the renames of a purge killed after its journal was written; True when one was finished."""
    journal = prep_dir / JOURNAL
    if not journal.is_file():
        shutil.rmtree(prep_dir / STAGING, ignore_errors=True)  # staged files of a purge killed before its journal
        return False
    for src, dst in json.loads(journal.read_text())["renames"]:
        src, dst = prep_dir / src, prep_dir / dst
        if src.exists():  # renamed already when a killed roll-forward got this far
            os.replace(src, dst)
    for name in json.loads(journal.read_text()).get("delete", []):
        (prep_dir / name).unlink(missing_ok=True)
    fsync_dir(prep_dir / SHARD_DIR)
    fsync_dir(prep_dir)
    journal.unlink()
    shutil.rmtree(prep_dir / STAGING, ignore_errors=True)
    return True


def purge_prepared_data(prep_dir: Path, sources: list[int], receipt_sha256: str | None = None) -> dict:
    """Remove ``sources``' documents from the prep output ``prep_dir``; returns counts of what went."""
    prep_dir = Path(prep_dir)
    roll_forward(prep_dir)
    index_path, manifest_path = prep_dir / SHARD_INDEX_NAME, prep_dir / MANIFEST_NAME
    for path in (index_path, manifest_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; --purge-data needs a `nulls prep` output folder")
    index = json.loads(index_path.read_text())
    table = pq.read_table(manifest_path)
    gone = set(int(s) for s in sources)
    rows = np.asarray(sorted(s for s in gone if s < table.num_rows), dtype=np.int64)
    shard_col = table["shard"].to_numpy(zero_copy_only=False)
    affected = sorted({int(shard_col[r]) for r in rows if not np.isnan(shard_col[r])} if len(rows) else set())
    staging = prep_dir / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    renames, delete, removed_docs, removed_tokens = [], [], 0, 0
    entries = index["shards"]
    for number in affected:
        entry = entries[number]
        path = prep_dir / SHARD_DIR / entry["name"]
        kept = []
        for sample in read_shard(path):
            meta = sample["meta"]
            if int(meta["source_index"]) in gone:
                removed_docs += 1
                removed_tokens += len(sample["tokens"])
            else:
                kept.append((int(meta["source_index"]), sample["tokens"], meta["title"], meta["key"]))
        if not kept:
            delete.append(f"{SHARD_DIR}/{entry['name']}")
            entry["documents"] = 0
            continue
        info = write_shard(staging / entry["name"], number, kept)
        entry.update(documents=info.documents, tokens=info.tokens, bytes=info.bytes, sha256=info.sha256,
                     first_source=info.first_source, last_source=info.last_source)
        renames.append([f"{STAGING}/{entry['name']}", f"{SHARD_DIR}/{entry['name']}"])
    index["shards"] = [e for e in entries if e["documents"] > 0]
    index["documents"] = sum(e["documents"] for e in index["shards"])
    index["tokens"] = sum(e["tokens"] for e in index["shards"])
    (staging / SHARD_INDEX_NAME).write_text(json.dumps(index, indent=1) + "\n")
    renames.append([f"{STAGING}/{SHARD_INDEX_NAME}", SHARD_INDEX_NAME])

    present = table["present"].to_numpy(zero_copy_only=False).copy()
    n_tokens = table["n_tokens"].to_numpy().copy()
    shard = table["shard"].to_pylist()
    for r in rows.tolist():
        present[r], n_tokens[r], shard[r] = False, 0, None
    table = table.set_column(table.schema.get_field_index("present"), "present", pa.array(present))
    table = table.set_column(table.schema.get_field_index("n_tokens"), "n_tokens", pa.array(n_tokens))
    table = table.set_column(table.schema.get_field_index("shard"), "shard", pa.array(shard, pa.int32()))
    pq.write_table(table.cast(SCHEMA), staging / MANIFEST_NAME, row_group_size=65536, compression="zstd")
    renames.append([f"{STAGING}/{MANIFEST_NAME}", MANIFEST_NAME])

    lineage_path = prep_dir / LINEAGE
    lineage = json.loads(lineage_path.read_text()) if lineage_path.is_file() else {"previous_sha256": [], "purges": []}
    lineage["previous_sha256"].append(_sha256(manifest_path))
    lineage["purges"].append({"sources": sorted(gone), "documents": removed_docs, "receipt_sha256": receipt_sha256})
    (staging / LINEAGE).write_text(json.dumps(lineage, indent=1) + "\n")
    renames.append([f"{STAGING}/{LINEAGE}", LINEAGE])
    for path in staging.iterdir():  # durable before the journal makes them the truth
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    fsync_dir(staging)
    with atomic_file(prep_dir / JOURNAL) as tmp:
        tmp.write_text(json.dumps({"renames": renames, "delete": delete}))
    roll_forward(prep_dir)
    return {"documents": removed_docs, "tokens": removed_tokens, "shards_rewritten": len(affected),
            "prep_dir": str(prep_dir)}

"""Which sources manifest a checkpoint was trained on: recorded at training time, checked at use.

A request to forget "Anarchism" must resolve to the source index the model was trained with.
The trainer records the prep output's ``manifest.parquet`` (its folder, sha256 and number of
sources) in the sink manifest's ``sources_manifest``; ``nulls unlearn`` and friends open that
manifest again and refuse it when its digest changed (a re-run prep may have renumbered, or
the folder was replaced). ``--manifest`` points elsewhere, with the same digest check unless
the checkpoint recorded none.
"""
from __future__ import annotations

import os
from pathlib import Path

from .digests import sha256_of

MANIFEST_NAME = "manifest.parquet"  # data_prep.manifest.MANIFEST_NAME; kept here so training imports no data_prep
LINEAGE = "manifest_lineage.json"  # written by nulls_megatron.unlearn.purge


class ProvenanceError(ValueError):
    """The sources manifest of a checkpoint is missing or is not the one it was trained on."""


def _verified_sha256(path: Path, expected: str) -> str:
    """sha256 of ``path``, remembered beside it once it matched ``expected``: a 6.4M-source manifest is
    ~200 MB, and every unlearning request would hash it again. The note (``.<name>.verified.json``)
    keys the digest on size, modification time and inode; any rewrite of the file changes them."""
    import json

    st = path.stat()
    key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino, "sha256": expected}
    note = path.with_name(f".{path.name}.verified.json")
    try:
        if json.loads(note.read_text()) == key:
            return expected
    except (OSError, ValueError):
        pass
    got = sha256_of(path).sha256
    if got == expected:
        try:
            tmp = note.with_name(note.name + f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps(key))
            os.replace(tmp, note)
        except OSError:  # a read-only data folder: hash every time
            pass
    return got


def describe_sources_manifest(prep_dir: str | os.PathLike) -> dict | None:
    """``{"dir", "sha256", "sources"}`` of ``<prep_dir>/manifest.parquet``, or None when the folder has none."""
    path = Path(prep_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    import pyarrow.parquet as pq  # here: training on data without a manifest needs no pyarrow

    return {"dir": str(path.parent.resolve()), "sha256": sha256_of(path).sha256,
            "sources": int(pq.ParquetFile(path).metadata.num_rows)}


def _purged_from(folder: Path) -> list[str]:
    """Digests of earlier manifests this one replaced by removing forgotten sources' documents
    (``nulls unlearn --purge-data``): the same source numbering, fewer documents present."""
    import json

    lineage = folder / LINEAGE
    if not lineage.is_file():
        return []
    try:
        return list(json.loads(lineage.read_text()).get("previous_sha256", []))
    except (ValueError, AttributeError):
        raise ProvenanceError(f"{lineage}: not valid JSON") from None


def sources_manifest_dir(recorded: dict | None, override: str | os.PathLike | None, where: str) -> Path:
    """The prep folder whose manifest resolves requests for a checkpoint, after the digest check.

    ``recorded`` is the checkpoint's ``sources_manifest`` (None for checkpoints trained before it
    was recorded, or on data without a manifest); ``override`` is the user's ``--manifest`` (a
    prep folder or its ``manifest.parquet``). ``where`` names the checkpoint in errors.
    """
    if override is not None:
        folder = Path(override)
        folder = folder.parent if folder.name == MANIFEST_NAME else folder
    elif recorded is not None:
        folder = Path(recorded["dir"])
    else:
        raise ProvenanceError(f"{where}: records no sources manifest (trained before provenance was recorded, "
                              "or on data without one); pass --manifest PREP_DIR")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        hint = "" if override is not None else " (recorded at training time; moved? pass --manifest PREP_DIR)"
        raise ProvenanceError(f"{path}: sources manifest not found{hint}")
    if recorded is not None:
        got = _verified_sha256(path, recorded["sha256"])
        if got != recorded["sha256"] and recorded["sha256"] not in _purged_from(folder):
            raise ProvenanceError(
                f"{path}: sha256 {got} differs from {recorded['sha256']}, the manifest {where} was trained on; "
                "source indices may not match the model (re-run prep? pass the original --manifest)")
    return folder

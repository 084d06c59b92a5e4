"""A checkpoint as the unlearning tools see it: files, sink manifest, assignment, versions.

Works on files alone: no model, no Megatron, no torch.distributed. A checkpoint argument may be
a checkpoint directory (``step-000000200``, or an unlearned version ``step-000000200-unlearn-001``),
a checkpoint root holding ``latest``, or a run directory holding ``checkpoints/latest``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint.atomic import LATEST, checkpoint_version, read_latest, version_name
from ..checkpoint.sinks import (MANIFEST, SINKS_DIR, SinkCheckpointError, SourceState, read_sink_manifest,
                                sha256_file, source_state)
from ..checkpoint.train_state import TRAIN_STATE
from ..sinks.assignment import Assignment, assignment_from_dict

RECEIPTS_DIR = "receipts"


@dataclass
class CheckpointView:
    path: Path
    manifest: dict
    state: SourceState

    @property
    def assignment(self) -> Assignment:
        return assignment_from_dict(self.manifest["assignment"])

    @property
    def layers(self) -> list[int]:
        return list(self.manifest["layers"])

    @property
    def sinks_dir(self) -> Path:
        return self.path / SINKS_DIR

    @property
    def root(self) -> Path:
        return self.path.parent

    def step(self) -> int | None:
        try:
            return int(json.loads((self.path / TRAIN_STATE).read_text())["step"])
        except (OSError, ValueError, KeyError):
            sv = checkpoint_version(self.path.name)
            return sv[0] if sv else None

    def is_latest(self) -> bool:
        try:
            latest = read_latest(self.root)
        except (OSError, ValueError):
            return False
        return latest is not None and latest.resolve() == self.path.resolve()

    def file_digests(self) -> dict[str, str]:
        return dict(self.manifest["files"])

    def verify_sink_files(self) -> None:
        """sha256 of every sink file against the manifest; raises naming the first mismatch."""
        for name, want in self.file_digests().items():
            path = self.sinks_dir / name
            if not path.is_file():
                raise SinkCheckpointError(f"{path}: missing (listed in {self.sinks_dir / MANIFEST}); refusing to unlearn")
            got = sha256_file(path)
            if got != want:
                raise SinkCheckpointError(f"{path}: sha256 {got} does not match the manifest's {want}; "
                                          "the checkpoint is damaged, refusing to unlearn (nothing was written)")

    def next_version_path(self) -> Path:
        sv = checkpoint_version(self.path.name)
        if sv is None:
            raise ValueError(f"{self.path}: not a checkpoint name (step-N or step-N-unlearn-V); pass --out DIR")
        step = sv[0]
        taken = [v for p in self.root.iterdir() if (v := checkpoint_version(p.name)) and v[0] == step]
        return self.root / version_name(step, max(v for _, v in taken) + 1)


def resolve_checkpoint(arg: str | Path) -> Path:
    """The checkpoint directory an argument names (a checkpoint, a root with ``latest``, a run dir)."""
    path = Path(arg)
    if (path / SINKS_DIR / MANIFEST).is_file():
        return path
    for root in (path, path / "checkpoints"):
        if (root / LATEST).is_file():
            latest = read_latest(root)
            if latest is not None:
                return latest
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    raise SinkCheckpointError(f"{path}: not a checkpoint (no {SINKS_DIR}/{MANIFEST}), nor a directory with a "
                              f"'{LATEST}' pointer or checkpoints/{LATEST}")


def open_checkpoint(arg: str | Path) -> CheckpointView:
    path = resolve_checkpoint(arg)
    manifest = read_sink_manifest(path)
    return CheckpointView(path, manifest, source_state(manifest))

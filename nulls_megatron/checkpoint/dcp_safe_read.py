"""Reading a torch.distributed.checkpoint (DCP) directory without arbitrary unpickling.

torch DCP writes its ``.metadata`` with ``pickle`` and reads byte items with ``torch.load(weights_only=False)``;
Megatron's torch_dist strategy reads through both. Here the metadata is unpickled admitting only DCP's own
dataclasses and enums, ``torch.Size`` and dtypes, pickled byte items are refused, and Megatron's common
state is read with ``weights_only=True`` (the reader is put in place by ``compat.dist_checkpoint_reader``).
"""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import (
    CachedMetadataFileSystemReader,
)
from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME, TorchCommonLoadStrategy
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType

DCP_METADATA = ".metadata"


class BackboneCheckpointError(ValueError):
    """A backbone checkpoint that is missing, unsafe, or does not fit the model it is loaded into."""


_SAFE_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # looks a layout up by name
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
    *(("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata",
    )),
    *(("torch.distributed.checkpoint.planner", n) for n in (
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "LoadPlan", "ReadItem", "LoadItemType",
    )),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Admits torch DCP's metadata dataclasses/enums, torch.Size and dtypes; nothing callable else."""

    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise BackboneCheckpointError(f"{self._path}: refusing to unpickle {module}.{name} (not checkpoint metadata)")


def load_dcp_metadata(path: Path) -> Any:
    """torch DCP's ``.metadata`` at ``path``, unpickled admitting only checkpoint metadata types."""
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f, path).load()
    except FileNotFoundError:
        raise BackboneCheckpointError(f"{path.parent}: no backbone checkpoint ({path.name} missing)") from None
    except BackboneCheckpointError:
        raise
    except Exception as e:  # truncated or garbled
        raise BackboneCheckpointError(f"{path}: unreadable checkpoint metadata ({type(e).__name__}: {e})") from e
    if not hasattr(metadata, "state_dict_metadata"):
        raise BackboneCheckpointError(f"{path}: not torch.distributed.checkpoint metadata")
    return metadata


class SafeFileSystemReader(CachedMetadataFileSystemReader):
    """Megatron's reader with the metadata unpickled safely and pickled byte items refused."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        if self._cached_metadata is None:
            metadata = load_dcp_metadata(Path(self.path) / DCP_METADATA)
            # As FileSystemReader.read_metadata does after its pickle.load.
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            self._cached_metadata = metadata
        return self._cached_metadata

    def read_data(self, plan: Any, planner: Any) -> Any:
        # Byte items are torch.load-ed with weights_only=False by torch's planner.
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                raise BackboneCheckpointError(f"{self.path}: refusing to read pickled object {item.dest_index.fqn}")
        return super().read_data(plan, planner)


class SafeCommonLoadStrategy(TorchCommonLoadStrategy):
    """The common state (``common.pt``) read with ``weights_only=True``."""

    def load_common(self, checkpoint_dir: str | os.PathLike) -> dict:
        path = Path(checkpoint_dir) / COMMON_STATE_FNAME
        if not path.is_file():
            return {}
        common = torch.load(path, map_location="cpu", weights_only=True)
        return common if isinstance(common, dict) else {}

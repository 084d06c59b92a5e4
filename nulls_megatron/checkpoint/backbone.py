"""The backbone half of a checkpoint: Megatron ``dist_checkpointing`` (torch_dist), reshardable.

``<dir>/backbone/`` holds what ``megatron.core.dist_checkpointing.save`` writes
(``.metadata``, ``__R_T.distcp``, ``common.pt``, ``metadata.json``) plus our own
``nulls_backbone.json`` (format, version, the caller's ``common`` dict, the
moment names and every saved tensor's global shape and dtype). Saved: every
parameter of the model except the sink tables (``SinkTable`` modules: their
weights, ``disabled`` flags and moments live in ``<dir>/sinks/``), and when given
the AdamW moments of every backbone parameter under Megatron's optimizer keys
``optimizer.state.<name>.<param key>`` with the parameter's own sharding, so
both reshard across tensor/pipeline sizes.

Loading never unpickles arbitrary objects: dist_checkpointing reads the torch
DCP ``.metadata`` with a plain ``pickle.load`` and byte items (Megatron's
``ShardedObject``s, e.g. ``_extra_state``) with ``torch.load(weights_only=False)``.
Here ``.metadata`` is read by an unpickler that admits only torch's checkpoint
metadata classes, byte items are neither saved nor read, tensors are read by
torch with ``weights_only=True`` and ``common.pt`` too; ``common`` itself is
kept as JSON. See docs/checkpoints.md, "Backbone".
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor
from megatron.core.dist_checkpointing.strategies.torch import (
    TorchDistLoadShardedStrategy,
    TorchDistSaveShardedStrategy,
)

from ..compat import dist_checkpoint_reader, in_process_write_queue, quiet_torch_dcp_deprecations
from ..model.nulls_mlp import NullsMegatronMLP
from ..sinks.table import SinkTable
from .atomic import atomic_file
from .dcp_safe_read import (DCP_METADATA, BackboneCheckpointError, SafeCommonLoadStrategy, SafeFileSystemReader,
                            load_dcp_metadata)
from .json_files import read_versioned_json

__all__ = [
    "BACKBONE_DIR", "BackboneCheckpointError", "FORMAT", "FORMAT_VERSION", "MANIFEST", "MOMENT_PREFIX",
    "backbone_sharded_state_dict", "load_backbone", "read_backbone_manifest", "read_backbone_metadata",
    "save_backbone",
]

FORMAT = "nulls-backbone"
FORMAT_VERSION = 1
BACKBONE_DIR = "backbone"
MANIFEST = "nulls_backbone.json"
MOMENT_PREFIX = "optimizer.state"  # Megatron's own prefix (optim_state_to_sharding_state)

Moments = dict[str, dict[str, torch.Tensor]]
ShardedEntry = ShardedTensor | ShardedTensorFactory


# ---------------------------------------------------------------------------------------------
# What is saved


def _sink_prefixes(model: torch.nn.Module) -> list[str]:
    return [f"{name}." for name, module in model.named_modules() if isinstance(module, SinkTable)]


def _sink_tensor_ids(model: torch.nn.Module) -> set[int]:
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, SinkTable):
            ids.update(id(t) for t in module.parameters())
            ids.update(id(t) for t in module.buffers())
    return ids


def backbone_sharded_state_dict(model: torch.nn.Module) -> dict[str, ShardedEntry]:
    """``model.sharded_state_dict()`` without sink tables or ``ShardedObject``s.

    The gated fc1 must come as gate|up halves (``NullsMegatronMLP.sharded_state_dict`` declares
    it so, as Megatron's MLP does): a plain per-rank shard would not reshard across TP sizes.
    """
    sinks, sink_ids = _sink_prefixes(model), _sink_tensor_ids(model)
    fc1_keys = {
        f"{name}.linear_fc1.{p}"
        for name, module in model.named_modules()
        if isinstance(module, NullsMegatronMLP)
        for p in ("weight", "bias")
    }
    out: dict[str, ShardedEntry] = {}
    for key, entry in model.sharded_state_dict().items():
        if any(key.startswith(prefix) for prefix in sinks):
            continue
        if isinstance(entry, ShardedObject):
            # Would be pickled on save and unpickled with weights_only=False on load;
            # Megatron's non-TE linears only ever hold None here.
            if entry.data is not None:
                raise BackboneCheckpointError(f"{key}: extra state {type(entry.data).__name__} is not saved (objects are never pickled)")
            continue
        if not isinstance(entry, (ShardedTensor, ShardedTensorFactory)):
            raise BackboneCheckpointError(f"{key}: unexpected {type(entry).__name__} in the model's sharded state dict")
        if id(entry.data) in sink_ids:
            raise BackboneCheckpointError(f"{key}: a sink-table tensor outside the sink modules' keys")
        if key in fc1_keys and not isinstance(entry, ShardedTensorFactory):
            raise BackboneCheckpointError(f"{key}: the gated fc1 must be a gate|up sharded factory to reshard across TP sizes")
        out[key] = entry
    return out


def _backbone_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    sink_ids = _sink_tensor_ids(model)
    return {n: p for n, p in model.named_parameters() if id(p) not in sink_ids}


def _entries_by_parameter(model: torch.nn.Module, model_sd: Mapping[str, ShardedEntry]) -> dict[str, ShardedEntry]:
    """Parameter name -> its sharded entry (matched by tensor identity, as Megatron's optimizers do)."""
    by_id = {id(entry.data): entry for entry in model_sd.values()}
    out, unmatched = {}, []
    for name, p in _backbone_parameters(model).items():
        if id(p) in by_id:
            out[name] = by_id[id(p)]
        else:
            unmatched.append(name)
    if unmatched:
        raise BackboneCheckpointError(f"parameters without a sharded state dict entry: {unmatched}")
    return out


def _leaf_tensors(entry: Any) -> Iterator[ShardedTensor]:
    """The ShardedTensors an entry turns into on disk (a factory's built pieces)."""
    if isinstance(entry, ShardedTensorFactory):
        yield from _leaf_tensors(entry.build())
    elif isinstance(entry, ShardedTensor):
        yield entry
    elif isinstance(entry, Mapping):
        for v in entry.values():
            yield from _leaf_tensors(v)
    elif isinstance(entry, (list, tuple)):
        for v in entry:
            yield from _leaf_tensors(v)


def read_backbone_metadata(dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``{key: {"shape": [...], "dtype": "float32"}}`` of every tensor in ``<dir>/backbone`` (safe unpickling)."""
    metadata = load_dcp_metadata(Path(dir) / BACKBONE_DIR / DCP_METADATA)
    out = {}
    for key, md in metadata.state_dict_metadata.items():
        if hasattr(md, "size"):
            out[key] = {"shape": list(md.size), "dtype": str(md.properties.dtype).removeprefix("torch.")}
        else:
            out[key] = {"bytes": True}
    return out



# ---------------------------------------------------------------------------------------------
# Collective agreement: a rank that refuses must not leave the others in a collective.


def _agree(error: str | None) -> None:
    """Raise on every rank if any rank found an error (its message, or the lowest failing rank's)."""
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)  # our own ranks' strings, in memory
    if error is not None:
        raise BackboneCheckpointError(error)
    for rank, e in enumerate(errors):
        if e is not None:
            raise BackboneCheckpointError(f"rank {rank}: {e}")


def _require_dist() -> None:
    if not dist.is_initialized():
        raise RuntimeError("backbone checkpoints are collective: initialise torch.distributed (and Megatron's model parallelism) first")


# ---------------------------------------------------------------------------------------------
# Save


def _moment_state(model: torch.nn.Module, model_sd: Mapping[str, ShardedEntry], moments: Moments) -> tuple[dict, list[str]]:
    entries = _entries_by_parameter(model, model_sd)
    params = _backbone_parameters(model)
    missing = sorted(set(entries) - set(moments))
    unknown = sorted(set(moments) - set(entries))
    if missing or unknown:
        raise BackboneCheckpointError(
            f"moments must cover exactly the backbone parameters of this rank: missing {missing}, "
            f"not backbone parameters {unknown} (sink-table moments are saved with the sink tables)"
        )
    names = sorted(next(iter(moments.values())).keys()) if moments else []
    state: dict[str, dict[str, ShardedEntry]] = {}
    for pname, entry in entries.items():
        given = moments[pname]
        if sorted(given) != names:
            raise BackboneCheckpointError(f"moments of {pname}: names {sorted(given)}, expected {names} as for the others")
        state[pname] = {}
        for mname, tensor in given.items():
            if tuple(tensor.shape) != tuple(params[pname].shape):
                raise BackboneCheckpointError(
                    f"moment {mname} of {pname}: shape {tuple(tensor.shape)}, the parameter's local shape is {tuple(params[pname].shape)}"
                )
            state[pname][mname] = make_sharded_optimizer_tensor(entry, tensor.detach(), prefix=f"{MOMENT_PREFIX}.{mname}")
    return state, names


def save_backbone(
    dir: str | os.PathLike,
    model: torch.nn.Module,
    moments: Moments | None = None,
    common: Mapping[str, Any] | None = None,
) -> None:
    """Write ``<dir>/backbone/``; collective over every rank of the default process group.

    Args:
        model: this rank's model (a pipeline stage, tensor-parallel shards).
        moments: ``{parameter name: {"exp_avg": t, "exp_avg_sq": t}}`` for every backbone
            parameter of this rank, each of the parameter's local shape; saved with the
            parameter's sharding so that they reshard with it.
        common: a small JSON-able dict (e.g. the optimizer step), returned by ``load_backbone``.
    """
    _require_dist()
    out = Path(dir) / BACKBONE_DIR
    error = None
    state: dict[str, Any] = {}
    names: list[str] = []
    try:
        common_json = json.dumps(dict(common or {}), sort_keys=True)
        if out.exists() and any(out.iterdir()):
            raise BackboneCheckpointError(f"{out} is not empty: a checkpoint is written once, into a fresh directory")
        state["model"] = backbone_sharded_state_dict(model)
        if moments is not None:
            state["optimizer"], names = _moment_state(model, state["model"], moments)
    except (BackboneCheckpointError, TypeError, ValueError) as e:
        error = f"save_backbone({out}): {e}"
    _agree(error)
    out.mkdir(parents=True, exist_ok=True)
    # thread_count=1: one writer process per rank (Megatron forks its writers), enough on CPU.
    strategy = TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1)
    with in_process_write_queue():
        dist_checkpointing.save(state, str(out), sharded_strategy=strategy)
    if dist.get_rank() == 0:
        _fix_save_id(out / DCP_METADATA)
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "common": json.loads(common_json),
            "moments": names,
            "saved_with": _parallel_layout(),
            "tensors": read_backbone_metadata(dir),  # re-read through the safe unpickler: fails early if unsafe
        }
        with atomic_file(out / MANIFEST) as tmp:
            tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    dist.barrier()


SAVE_ID = "nulls-backbone"


def _fix_save_id(path: Path) -> None:
    """torch DCP records a random uuid (``storage_meta.save_id``) and the directory it wrote to
    (``checkpoint_id``: our temp directory, with its pid) in ``.metadata``: the same state saved twice,
    or by a resumed run into another directory, would differ in those bytes, and digests could not show
    that a resume reproduced a checkpoint. Nothing reads either back (a load names its own directory),
    so the id becomes a constant and the directory is dropped (the file re-pickled as torch writes it)."""
    metadata = load_dcp_metadata(path)
    if getattr(metadata, "storage_meta", None) is not None:
        metadata.storage_meta.save_id = SAVE_ID
        metadata.storage_meta.checkpoint_id = None
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            pickle.dump(metadata, f)


def _parallel_layout() -> dict[str, int]:
    from megatron.core import parallel_state

    return {
        "world_size": dist.get_world_size(),
        "tensor_parallel": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_parallel": parallel_state.get_pipeline_model_parallel_world_size(),
    }


# ---------------------------------------------------------------------------------------------
# Load


def read_backbone_manifest(dir: str | os.PathLike) -> dict[str, Any]:
    """``<dir>/backbone/nulls_backbone.json``, checked for format and version."""
    return read_versioned_json(Path(dir) / BACKBONE_DIR / MANIFEST, FORMAT, FORMAT_VERSION, error=BackboneCheckpointError,
                               missing="missing: no backbone checkpoint here")


def _check_against_checkpoint(state: Mapping[str, Any], saved: Mapping[str, dict], out: Path) -> None:
    problems = []
    seen = set()
    for sh in _leaf_tensors(state):
        if sh.key in seen:
            continue
        seen.add(sh.key)
        if sh.key not in saved or "shape" not in saved[sh.key]:
            problems.append(f"tensor {sh.key!r} is not in the checkpoint")
        elif list(sh.global_shape) != saved[sh.key]["shape"]:
            problems.append(
                f"tensor {sh.key!r} has full shape {tuple(saved[sh.key]['shape'])} in the checkpoint, "
                f"{tuple(sh.global_shape)} in the model"
            )
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise BackboneCheckpointError(f"{out}: " + "; ".join(problems[:3]) + more)


def load_backbone(dir: str | os.PathLike, model: torch.nn.Module, with_moments: bool) -> tuple[Moments | None, dict[str, Any]]:
    """Load ``<dir>/backbone/`` into ``model`` (any TP/PP layout); collective over every rank.

    Returns ``(moments, common)``: moments keyed by this rank's parameter names with
    local shapes (None unless ``with_moments``), and the ``common`` dict given to
    ``save_backbone``. Sink tables are left untouched (load them with sinks.py).
    Every tensor is checked against the checkpoint (present, same full shape)
    before anything is read, on every rank.
    """
    _require_dist()
    out = Path(dir) / BACKBONE_DIR
    error, manifest = None, {}
    state: dict[str, Any] = {}
    try:
        manifest = read_backbone_manifest(dir)
        saved = read_backbone_metadata(dir)
        if with_moments and not manifest.get("moments"):
            raise BackboneCheckpointError(f"{out}: saved without optimizer moments")
        state["model"] = backbone_sharded_state_dict(model)
        if with_moments:
            params = _backbone_parameters(model)
            entries = _entries_by_parameter(model, state["model"])
            state["optimizer"] = {}
            for pname, entry in entries.items():
                state["optimizer"][pname] = {}
                for mname in manifest["moments"]:
                    key = f"{MOMENT_PREFIX}.{mname}.{entry.key}"
                    dtype = getattr(torch, saved[key]["dtype"]) if key in saved and "dtype" in saved[key] else params[pname].dtype
                    target = torch.empty(params[pname].shape, dtype=dtype)
                    state["optimizer"][pname][mname] = make_sharded_optimizer_tensor(entry, target, prefix=f"{MOMENT_PREFIX}.{mname}")
        _check_against_checkpoint(state, saved, out)
    except BackboneCheckpointError as e:
        error = str(e)
    _agree(error)

    with dist_checkpoint_reader(SafeFileSystemReader), quiet_torch_dcp_deprecations():
        loaded = dist_checkpointing.load(
            state, str(out), sharded_strategy=TorchDistLoadShardedStrategy(), common_strategy=SafeCommonLoadStrategy()
        )
    result = model.load_state_dict(loaded["model"], strict=False)
    sinks = tuple(_sink_prefixes(model))
    missing = [k for k in result.missing_keys if not k.startswith(sinks) and not k.endswith("._extra_state")]
    if missing or result.unexpected_keys:
        raise BackboneCheckpointError(f"{out}: model keys not loaded {missing}, unexpected {result.unexpected_keys}")
    moments = None
    if with_moments:
        moments = {
            pname: {mname: t.detach() for mname, t in per.items()} for pname, per in loaded["optimizer"].items()
        }
    return moments, dict(manifest.get("common", {}))

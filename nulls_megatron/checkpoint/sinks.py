"""Sink tables on disk: one safetensors file per layer and pool shard, plus a manifest.

``<dir>/sinks/layer-{L:03d}-shard-{E:03d}.safetensors`` holds rows
``E*P .. (E+1)*P`` (``P = n_pool // n_shards``) of layer ``L``'s table:
``weight`` [P, 3, d], ``disabled`` uint8 [P] and, when given, ``optim.<name>``
(e.g. ``optim.exp_avg``) for the same rows. ``<dir>/sinks/manifest.json`` holds
the format version, shapes, dtype, assignment parameters, layer numbers, the
sources' state (:class:`SourceState`: erased and suppressed sources, the sources
manifest the model was trained on, the unlearning receipts) and the sha256 of
every file. The manifest is written last, so a manifest implies complete files;
loading checks every digest before reading a tensor. The files do not depend on
how the pool was sharded in training: a table holding only an expert-parallel
rank's rows (``SinkTable.row_start:row_stop``, whole pool shards) writes and reads
just its shards' files, so a checkpoint saved at one expert-parallel size loads
at any other (and unlearning, export and evaluation read it as any other). Only safetensors are read:
no pickle anywhere. The same tensors always give the same bytes (the metadata is
one sorted JSON string), so equal digests show equal checkpoints.
"""
from __future__ import annotations

import hashlib
import json
import os
import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from ..sinks.assignment import ID_LIMIT
from ..sinks.table import SinkTable
from .atomic import atomic_file
from .digests import sha256_of
from .json_files import read_versioned_json

__all__ = [
    "FORMAT", "FORMAT_VERSION", "SinkCheckpointError", "SourceState", "load_sink_tables", "read_sink_manifest",
    "safetensors_bytes", "save_sink_tables", "shard_file_name", "sha256_file", "source_state", "table_key",
    "write_sink_files", "write_sink_manifest",
]

FORMAT = "nulls-sink-tables"
FORMAT_VERSION = 1
SINKS_DIR = "sinks"
MANIFEST = "manifest.json"
OPTIM_PREFIX = "optim."

OptimizerState = dict[str, dict[str, torch.Tensor]]


class SinkCheckpointError(ValueError):
    """A sink checkpoint that does not match its manifest or the tables it is loaded into."""


@dataclass
class SourceState:
    """What the checkpoint knows about its sources beyond the weights, carried from version to version.

    - ``disabled_sources``: erased by ``nulls unlearn``: their rows are zero in every weight and
      optimizer tensor and flagged disabled;
    - ``suppressed_sources``: masked only (``nulls unlearn --suppress``): rows flagged disabled,
      weights kept, reversible;
    - ``sources_manifest``: the sources manifest the model was trained on (``dir``, ``sha256``,
      ``sources``), recorded at training time, so that a request by title resolves to the same index;
    - ``receipts``: ``{"name", "sha256", "action"}`` of every unlearning receipt applied so far.
    """

    disabled_sources: list[int] = dataclasses.field(default_factory=list)
    suppressed_sources: list[int] = dataclasses.field(default_factory=list)
    sources_manifest: dict | None = None
    receipts: list[dict] = dataclasses.field(default_factory=list)

    def off_sources(self) -> list[int]:
        """Every source whose sinks are off: erased or suppressed."""
        return sorted(set(self.disabled_sources) | set(self.suppressed_sources))

    def to_json(self) -> dict:
        for name in ("disabled_sources", "suppressed_sources"):
            bad = [s for s in getattr(self, name) if not 0 <= int(s) < ID_LIMIT]
            if bad:
                raise ValueError(f"{name}: ids {bad[:5]} are outside [0, 2**32)")
        return {"disabled_sources": [int(s) for s in self.disabled_sources],
                "suppressed_sources": sorted(int(s) for s in self.suppressed_sources),
                "sources_manifest": self.sources_manifest, "receipts": list(self.receipts)}


def source_state(manifest: dict) -> SourceState:
    """The :class:`SourceState` of a parsed sink manifest (fields absent in older checkpoints default to empty)."""
    return SourceState(
        disabled_sources=[int(s) for s in manifest.get("disabled_sources", [])],
        suppressed_sources=[int(s) for s in manifest.get("suppressed_sources", [])],
        sources_manifest=manifest.get("sources_manifest"),
        receipts=list(manifest.get("receipts", [])),
    )


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors serialisation with deterministic bytes: the metadata goes in as one JSON
    string with sorted keys (the library writes a metadata dict in a random key order)."""
    return save(tensors, metadata={"nulls": json.dumps(metadata, sort_keys=True)})


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def table_key(table: SinkTable) -> str:
    """Key of a table in ``optimizer_state``: ``layer-{L:03d}``."""
    return f"layer-{table.layer_number:03d}"


def shard_file_name(layer: int, shard: int) -> str:
    return f"layer-{layer:03d}-shard-{shard:03d}.safetensors"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def sha256_file(path: Path) -> str:
    return sha256_of(path).sha256


def _common(tables: Sequence[SinkTable]) -> dict:
    """What every table must share (assignment, width, dtype), checked across the list."""
    if not tables:
        raise ValueError("sink checkpoint: no tables given")
    first = tables[0]
    ref = {"assignment": asdict(first.assignment), "hidden_size": first.hidden_size,
           "dtype": _dtype_name(first.weight.dtype)}
    seen = set()
    for t in tables:
        got = {"assignment": asdict(t.assignment), "hidden_size": t.hidden_size, "dtype": _dtype_name(t.weight.dtype)}
        for field, value in got.items():
            if value != ref[field]:
                raise ValueError(f"sink checkpoint: layer {t.layer_number} has {field} {value}, "
                                 f"layer {first.layer_number} has {ref[field]}; all tables must agree")
        if t.layer_number in seen:
            raise ValueError(f"sink checkpoint: layer {t.layer_number} appears twice")
        seen.add(t.layer_number)
    return ref


def _check_optimizer_state(tables: Sequence[SinkTable], state: OptimizerState) -> list[str]:
    keys = {table_key(t): t for t in tables}
    unknown = sorted(set(state) - set(keys))
    if unknown:
        raise ValueError(f"optimizer_state: keys {unknown} match no table (expected {sorted(keys)})")
    names: list[str] | None = None
    for key, t in keys.items():
        if key not in state:
            raise ValueError(f"optimizer_state: no entry for {key}")
        if names is None:
            names = sorted(state[key])
        if sorted(state[key]) != names:
            raise ValueError(f"optimizer_state[{key!r}] has {sorted(state[key])}, others have {names}")
        for name, tensor in state[key].items():
            held = t.row_stop - t.row_start
            if tensor.dim() == 0 or tensor.shape[0] != held:
                raise ValueError(f"optimizer_state[{key!r}][{name!r}] has shape {tuple(tensor.shape)}; "
                                 f"a per-row tensor with leading dim {held} (the table's rows) is required")
    return names or []


def save_sink_tables(
    dir: str | os.PathLike,
    tables: Sequence[SinkTable],
    optimizer_state: OptimizerState | None = None,
    disabled_sources: Iterable[int] = (),
    progress: Callable[[Path], None] | None = None,
    state: SourceState | None = None,
) -> Path:
    """Write ``tables`` (and their per-row optimizer tensors) under ``dir/sinks``; returns the manifest path.

    Each file is written atomically and the manifest last. ``progress`` is called
    with each file's final path once it is in place (logging; tests use it to
    kill the process mid-save).
    """
    part = write_sink_files(dir, tables, optimizer_state, progress)
    state = state or SourceState()
    if disabled_sources:
        state.disabled_sources = [int(s) for s in disabled_sources]
    return write_sink_manifest(dir, [part], state)


def write_sink_files(
    dir: str | os.PathLike,
    tables: Sequence[SinkTable],
    optimizer_state: OptimizerState | None = None,
    progress: Callable[[Path], None] | None = None,
) -> dict:
    """The shard files of ``tables`` without a manifest; returns a JSON-able *part* (layers, digests,
    shared fields) for :func:`write_sink_manifest`. Pipeline stages each write their own layers,
    expert-parallel ranks their own pool shards, and one rank writes the manifest from every part."""
    common = _common(tables)
    optim_names = _check_optimizer_state(tables, optimizer_state) if optimizer_state else []
    a = tables[0].assignment
    rows = a.shard_size
    out = Path(dir) / SINKS_DIR
    out.mkdir(parents=True, exist_ok=True)
    digests: dict[str, str] = {}
    for t in sorted(tables, key=lambda t: t.layer_number):
        weight = t.weight.detach()
        disabled = t.disabled.detach().to(torch.uint8)
        opt = optimizer_state[table_key(t)] if optimizer_state else {}
        for shard in _held_shards(t):
            lo, hi = shard * rows, (shard + 1) * rows
            local = slice(lo - t.row_start, hi - t.row_start)
            tensors = {"weight": weight[local], "disabled": disabled[local]}
            tensors.update({OPTIM_PREFIX + n: opt[n].detach()[local] for n in optim_names})
            # safetensors wants contiguous CPU tensors that own no shared storage.
            tensors = {k: v.to("cpu").contiguous().clone() for k, v in tensors.items()}
            meta = {"format": FORMAT, "layer": str(t.layer_number), "shard": str(shard), "rows": f"{lo}:{hi}"}
            name = shard_file_name(t.layer_number, shard)
            data = safetensors_bytes(tensors, meta)
            write_bytes_atomic(out / name, data)
            digests[name] = hashlib.sha256(data).hexdigest()
            if progress is not None:
                progress(out / name)
    return {"common": common, "layers": sorted(t.layer_number for t in tables),
            "optimizer_tensors": optim_names, "files": digests}


def _held_shards(table: SinkTable) -> range:
    """The pool shards whose rows ``table`` holds (all of them without expert parallelism)."""
    rows = table.assignment.shard_size
    if table.row_start % rows or table.row_stop % rows:
        raise ValueError(f"sink table of layer {table.layer_number} holds rows {table.row_start}:{table.row_stop}, "
                         f"not whole pool shards of {rows} rows")
    return range(table.row_start // rows, table.row_stop // rows)


def write_sink_manifest(dir: str | os.PathLike, parts: Sequence[dict], state: SourceState | None = None) -> Path:
    """Write ``dir/sinks/manifest.json`` over the files of ``parts`` (from :func:`write_sink_files`),
    after checking that the parts agree, write no file twice and together hold every pool shard of
    every layer they name; returns its path."""
    if not parts:
        raise ValueError("sink manifest: no parts given")
    sources_json = (state or SourceState()).to_json()
    common, optim_names = parts[0]["common"], parts[0]["optimizer_tensors"]
    layers: set[int] = set()
    digests: dict[str, str] = {}
    for part in parts:
        for field, mine in (("common", common), ("optimizer_tensors", optim_names)):
            if part[field] != mine:
                raise ValueError(f"sink manifest: parts disagree on {field}: {part[field]} vs {mine}")
        clash = set(digests) & set(part["files"])
        if clash:
            raise ValueError(f"sink manifest: files {sorted(clash)[:4]} were written twice")
        layers |= set(part["layers"])
        digests.update(part["files"])
    a = common["assignment"]
    missing = [shard_file_name(layer, shard) for layer in sorted(layers) for shard in range(a["n_shards"])
               if shard_file_name(layer, shard) not in digests]
    if missing:
        raise ValueError(f"sink manifest: no part wrote {len(missing)} shard file(s), e.g. {missing[:4]}")
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "dtype": common["dtype"],
        "hidden_size": common["hidden_size"],
        "weight_shape": [a["n_pool"], 3, common["hidden_size"]],
        "shard_rows": a["n_pool"] // a["n_shards"],
        "assignment": a,
        "layers": sorted(layers),
        "optimizer_tensors": optim_names,
        **sources_json,
        "files": dict(sorted(digests.items())),
    }
    out = Path(dir) / SINKS_DIR
    with atomic_file(out / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    # A re-save into the same dir with fewer layers must not leave stale shards behind.
    for stale in out.glob("*.safetensors"):
        if stale.name not in digests:
            stale.unlink()
    return out / MANIFEST


def read_sink_manifest(dir: str | os.PathLike) -> dict:
    """The parsed ``dir/sinks/manifest.json``, checked for format and version."""
    return read_versioned_json(Path(dir) / SINKS_DIR / MANIFEST, FORMAT, FORMAT_VERSION, error=SinkCheckpointError,
                               missing="no sink manifest (not a sink checkpoint, or an unfinished save)")


def _check_tables(manifest: dict, tables: Sequence[SinkTable], path: Path) -> None:
    common = _common(tables)
    for field, value in common["assignment"].items():
        saved = manifest["assignment"].get(field)
        if saved != value:
            raise SinkCheckpointError(f"{path}: assignment.{field} is {saved!r} in the checkpoint, "
                                      f"{value!r} in the model")
    for field in ("hidden_size", "dtype"):
        if manifest[field] != common[field]:
            raise SinkCheckpointError(f"{path}: {field} is {manifest[field]!r} in the checkpoint, "
                                      f"{common[field]!r} in the model")
    for t in tables:
        if t.layer_number not in manifest["layers"]:
            raise SinkCheckpointError(f"{path}: layer {t.layer_number} is not in the checkpoint "
                                      f"(layers {manifest['layers']})")


def _verify_file(out: Path, name: str, manifest: dict, shapes: dict[str, list[int]], optim_keys: list[str],
                 rows: int) -> None:
    """Digest first (nothing is parsed from an unverified file), then tensor names and shapes."""
    path = out / name
    want = manifest["files"].get(name)
    if want is None:
        raise SinkCheckpointError(f"{out / MANIFEST}: lists no digest for {name}")
    if not path.is_file():
        raise SinkCheckpointError(f"{path}: missing (listed in {out / MANIFEST})")
    got = sha256_file(path)
    if got != want:
        raise SinkCheckpointError(f"{path}: sha256 {got} does not match the manifest's {want}")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        expected = set(shapes) | set(optim_keys)
        if keys != expected:
            raise SinkCheckpointError(f"{path}: holds tensors {sorted(keys)}, expected {sorted(expected)}")
        for key in sorted(expected):
            have = list(f.get_slice(key).get_shape())
            # Optimizer tensors only share the row dim with the weight.
            ok = have == shapes[key] if key in shapes else (len(have) >= 1 and have[0] == rows)
            if not ok:
                want_shape = shapes.get(key, [rows, "..."])
                raise SinkCheckpointError(f"{path}: {key} has shape {have}, expected {want_shape}")


def load_sink_tables(dir: str | os.PathLike, tables: Sequence[SinkTable]) -> OptimizerState | None:
    """Load ``tables`` from ``dir/sinks`` in place; returns their optimizer tensors, or None if none were saved.

    Every file the tables need is checked (sha256, tensor names, shapes) before
    any table is touched, so a refused checkpoint leaves the model unchanged.
    ``tables`` may be a subset of the saved layers (a pipeline stage's) and hold a subset of the pool's
    rows (an expert-parallel rank's shards): each reads just its own files.
    """
    manifest = read_sink_manifest(dir)
    out = Path(dir) / SINKS_DIR
    _check_tables(manifest, tables, out / MANIFEST)
    a = tables[0].assignment
    rows, d = a.shard_size, tables[0].hidden_size
    optim_names = list(manifest.get("optimizer_tensors", []))
    names = [(t, s, shard_file_name(t.layer_number, s)) for t in tables for s in _held_shards(t)]
    shapes = {"weight": [rows, 3, d], "disabled": [rows]}
    optim_keys = [OPTIM_PREFIX + n for n in optim_names]
    for _, _, name in names:
        _verify_file(out, name, manifest, shapes, optim_keys, rows)
    result: OptimizerState = {}
    with torch.no_grad():
        for t, shard, name in names:
            data = load_file(str(out / name))
            local = slice(shard * rows - t.row_start, (shard + 1) * rows - t.row_start)
            t.weight[local].copy_(data["weight"])
            t.disabled[local].copy_(data["disabled"].to(torch.bool))
            for n in optim_names:
                result.setdefault(table_key(t), {}).setdefault(n, []).append(data[OPTIM_PREFIX + n])
    if not optim_names:
        return None
    return {key: {n: torch.cat(parts) for n, parts in state.items()} for key, state in result.items()}

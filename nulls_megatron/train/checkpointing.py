"""A training checkpoint across all ranks: backbone, sink tables, optimizer, data position.

```
<run_dir>/checkpoints/
  latest                        # name of the newest complete checkpoint, written last
  step-000000200/
    backbone/                   # Megatron dist_checkpointing: weights + AdamW moments (checkpoint/backbone.py)
    sinks/                      # safetensors per layer and pool shard + manifest.json (checkpoint/sinks.py)
    train_state.json            # step, optimizer steps, tokens, every data-parallel rank's loader cursor
    config.yaml                 # the run's config, for `nulls train --config <ckpt>/config.yaml`
```
The whole directory is written under a temporary name by every rank together, then
renamed by rank 0 once all ranks are done, and only then does ``latest`` move: a job
killed at any moment leaves the previous checkpoint intact and named by ``latest``.
Nothing here unpickles: JSON, YAML, safetensors and dist_checkpointing's tensor files.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from megatron.core import parallel_state

from ..checkpoint.atomic import atomic_dir, atomic_file, checkpoint_name, clean_partial, prune, read_latest, update_latest
from ..checkpoint.json_files import read_versioned_json
from ..checkpoint.backbone import load_backbone, save_backbone
from ..checkpoint.sinks import (SourceState, load_sink_tables, read_sink_manifest, source_state, table_key,
                                write_sink_files, write_sink_manifest)
from ..config import Config
from ..sinks.table import SinkTable
from .engines.base import Engine
from .engines.param_groups import sink_parameters
from .prefetch import PrefetchLoader

logger = logging.getLogger(__name__)

TRAIN_STATE = "train_state.json"
TRAIN_STATE_FORMAT = "nulls-train-state-1"
CHECKPOINTS = "checkpoints"


def checkpoint_root(cfg: Config) -> Path:
    return Path(cfg.train.run_dir) / CHECKPOINTS


def _tables(module: torch.nn.Module) -> list[SinkTable]:
    return [m for m in module.modules() if isinstance(m, SinkTable)]


def _backbone_named(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    sinks = sink_parameters(module)
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad and id(p) not in sinks]


def _broadcast_from_zero(value):
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def prepare_checkpoint_root(cfg: Config) -> Path:
    """Create the checkpoint root and remove debris of killed saves (rank 0, before any save)."""
    root = checkpoint_root(cfg)
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for path in clean_partial(root):
            logger.warning("removed an unfinished checkpoint save: %s", path)
    dist.barrier()
    return root


def save_checkpoint(cfg: Config, step: int, engine: Engine, loader: PrefetchLoader, tokens: int,
                    sources: SourceState) -> Path:
    """Collective: every rank calls it after optimizer step ``step``. Returns the final directory."""
    root = checkpoint_root(cfg)
    final = root / checkpoint_name(step)
    module = engine.module
    # Every rank computes moments in the same order: the DeepSpeed engine gathers them over DP.
    backbone_moments = {name: engine.moments(p) for name, p in _backbone_named(module)}
    tables = _tables(module)
    sink_moments = {table_key(t): engine.moments(t.weight) for t in tables}
    loader_states = [None] * dist.get_world_size()
    dist.all_gather_object(loader_states, {"dp_rank": parallel_state.get_data_parallel_rank(), "state": loader.state_dict()})
    writes_sinks = parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0

    def write_all(tmp: Path) -> None:
        save_backbone(tmp, module, moments=backbone_moments, common={"optimizer_steps": engine.optimizer_steps()})
        part = write_sink_files(tmp, tables, sink_moments) if writes_sinks and tables else None
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, part)
        if dist.get_rank() == 0:
            write_sink_manifest(tmp, [p for p in parts if p is not None], sources)
            with atomic_file(tmp / TRAIN_STATE) as f:
                f.write_text(json.dumps(_train_state(cfg, step, engine, tokens, loader_states), indent=1) + "\n")
            with atomic_file(tmp / "config.yaml") as f:
                f.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    if dist.get_rank() == 0:
        with atomic_dir(final) as tmp:
            _broadcast_from_zero(str(tmp))
            write_all(tmp)
            dist.barrier()  # every rank's backbone files are on disk before the rename
        update_latest(root, final.name)
        for path in prune(root, cfg.train.keep_last):
            logger.info("pruned checkpoint %s", path)
    else:
        write_all(Path(_broadcast_from_zero(None)))
        dist.barrier()
    dist.barrier()  # nobody starts the next step (or exits) before `latest` names this checkpoint
    return final


def _train_state(cfg: Config, step: int, engine: Engine, tokens: int, loader_states: list[dict]) -> dict:
    loaders: dict[int, dict] = {}
    for item in loader_states:
        rank, state = item["dp_rank"], item["state"]
        if rank in loaders and loaders[rank] != state:
            raise RuntimeError(f"ranks of data-parallel replica {rank} disagree on the loader position: "
                               f"{loaders[rank]} vs {state}")
        loaders[rank] = state
    return {
        "format": TRAIN_STATE_FORMAT,
        "step": step,
        "optimizer_steps": engine.optimizer_steps(),
        "tokens": tokens,
        "engine": cfg.train.engine.value,
        "parallel": {"tensor": parallel_state.get_tensor_model_parallel_world_size(),
                     "pipeline": parallel_state.get_pipeline_model_parallel_world_size(),
                     "data": parallel_state.get_data_parallel_world_size()},
        "loaders": [loaders[r] for r in sorted(loaders)],
    }


def read_train_state(path: Path) -> dict:
    return read_versioned_json(path / TRAIN_STATE, TRAIN_STATE_FORMAT,
                               missing=f"missing; {path} is not a complete training checkpoint")


def latest_checkpoint(cfg: Config) -> Path | None:
    return read_latest(checkpoint_root(cfg))


def load_checkpoint(path: Path, engine: Engine, loader: PrefetchLoader) -> tuple[dict, SourceState]:
    """Collective: restore weights, moments, optimizer steps and this rank's loader position from
    ``path``. Returns (train state, the sink manifest's source state: forgotten sources, provenance)."""
    state = read_train_state(path)
    module = engine.module
    dp_world = parallel_state.get_data_parallel_world_size()
    if len(state["loaders"]) != dp_world:
        raise ValueError(f"{path / TRAIN_STATE}: saved with {len(state['loaders'])} data-parallel replicas, this run "
                         f"has {dp_world}; the data order is tied to the data-parallel size (tensor and pipeline "
                         f"sizes may change)")
    moments, common = load_backbone(path, module, with_moments=True)
    tables = _tables(module)
    sink_state = load_sink_tables(path, tables) if tables else None
    named = _backbone_named(module)
    pairs = [(p, moments[name]) for name, p in named]
    if sink_state is not None:
        pairs += [(t.weight, sink_state[table_key(t)]) for t in tables]
    engine.load_moments(pairs, steps=int(common["optimizer_steps"]))
    loader.load_state_dict(state["loaders"][parallel_state.get_data_parallel_rank()])
    return state, source_state(read_sink_manifest(path))

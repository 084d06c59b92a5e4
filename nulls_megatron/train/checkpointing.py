"""A training checkpoint across all ranks: backbone, sink tables, optimizer, data position.

```
<run_dir>/checkpoints/
  latest                        # name of the newest complete checkpoint, written last
  step-000000200/
    backbone/                   # Megatron dist_checkpointing: weights + AdamW moments (checkpoint/backbone.py)
    sinks/                      # safetensors per layer and pool shard + manifest.json (checkpoint/sinks.py)
    train_state.json            # step, optimizer steps, tokens, last loss, every data-parallel rank's loader cursor
    config.yaml                 # the run's config, for `nulls train --config <ckpt>/config.yaml`
    digests.json                # sha256 and size of every file above (checkpoint/digests.py), written last
```
The whole directory is written under a temporary name by every rank together, then
renamed by rank 0 once all ranks are done, and only then does ``latest`` move: a job
killed at any moment leaves the previous checkpoint intact and named by ``latest``.
Loading first checks every file against ``digests.json`` (each rank hashes a share), so a
damaged checkpoint is refused before any tensor is read, naming the nearest older one that verifies.
Nothing here unpickles: JSON, YAML, safetensors and dist_checkpointing's tensor files.
"""
from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from megatron.core import parallel_state

from ..checkpoint.atomic import (atomic_dir, atomic_file, checkpoint_name, clean_partial, list_checkpoints, prune,
                                read_latest, roll_back, update_latest)
from ..checkpoint.digests import (CheckpointCorruptError, checkpoint_files, hash_share, nearest_good, read_digests,
                                  verify_share, write_digests)
from ..checkpoint.train_state import CHECKPOINTS, TRAIN_STATE, TRAIN_STATE_FORMAT, read_train_state
from ..checkpoint.backbone import load_backbone, save_backbone
from ..checkpoint.sinks import (SourceState, load_sink_tables, read_sink_manifest, source_state, table_key,
                                write_sink_files, write_sink_manifest)
from ..config import Config
from ..sinks.table import SinkTable
from .engines.base import Engine
from .engines.param_groups import sink_parameters
from .prefetch import PrefetchLoader

logger = logging.getLogger(__name__)


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
                    sources: SourceState, loss: float | None = None) -> Path:
    """Collective: every rank calls it after optimizer step ``step``. Returns the final directory."""
    root = checkpoint_root(cfg)
    final = root / checkpoint_name(step)
    engine.sync_params()  # parameters whose all-gather an overlapping engine left to the next forward
    module = engine.module
    # Every rank computes moments in the same order: the DeepSpeed engine gathers them over DP.
    backbone_moments = {name: engine.moments(p) for name, p in _backbone_named(module)}
    tables = _tables(module)
    sink_moments = {table_key(t): engine.moments(t.weight) for t in tables}
    loader_states = [None] * dist.get_world_size()
    dist.all_gather_object(loader_states, {"dp_rank": parallel_state.get_data_parallel_rank(), "state": loader.state_dict()})
    # One replica writes the sink files: each expert-parallel rank of it its own pool shards.
    writes_sinks = (parallel_state.get_tensor_model_parallel_rank() == 0
                    and parallel_state.get_expert_data_parallel_rank() == 0)

    def write_all(tmp: Path) -> None:
        save_backbone(tmp, module, moments=backbone_moments, common={"optimizer_steps": engine.optimizer_steps()})
        part = write_sink_files(tmp, tables, sink_moments) if writes_sinks and tables else None
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, part)
        if dist.get_rank() == 0:
            write_sink_manifest(tmp, [p for p in parts if p is not None], sources)
            with atomic_file(tmp / TRAIN_STATE) as f:
                f.write_text(json.dumps(_train_state(cfg, step, engine, tokens, loader_states, loss), indent=1) + "\n")
            with atomic_file(tmp / "config.yaml") as f:
                f.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        # Every file is on disk (the backbone's too): hash them, each rank a share, and record the digests last.
        dist.barrier()
        names = _broadcast_from_zero(checkpoint_files(tmp) if dist.get_rank() == 0 else None)
        shares: list[dict | None] = [None] * dist.get_world_size()
        dist.all_gather_object(shares, hash_share(tmp, names, dist.get_rank(), dist.get_world_size()))
        if dist.get_rank() == 0:
            write_digests(tmp, {k: v for share in shares for k, v in share.items()})

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


def _train_state(cfg: Config, step: int, engine: Engine, tokens: int, loader_states: list[dict],
                 loss: float | None = None) -> dict:
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
        "loss": loss,
        "engine": cfg.train.engine.value,
        "parallel": {"tensor": parallel_state.get_tensor_model_parallel_world_size(),
                     "pipeline": parallel_state.get_pipeline_model_parallel_world_size(),
                     "data": parallel_state.get_data_parallel_world_size()},
        "loaders": [loaders[r] for r in sorted(loaders)],
    }


def latest_checkpoint(cfg: Config) -> Path | None:
    return read_latest(checkpoint_root(cfg))


def resume_point(cfg: Config, resume_from: str | None = None) -> Path | None:
    """Collective: the checkpoint this run resumes from (None: a fresh run).

    ``resume_from`` (a step, or a checkpoint name) is the sanctioned roll back: newer checkpoints
    move aside into ``rolled-back-<time>/`` (never deleted) and ``latest`` names the target. A
    root with checkpoints but no ``latest`` is refused rather than silently restarted from step 0,
    and so is a roll back past an unlearning (the older weights still hold the forgotten rows).
    """
    root = checkpoint_root(cfg)
    error, chosen = None, None
    if dist.get_rank() == 0:
        try:
            chosen = _resume_point(root, resume_from)
        except (ValueError, FileNotFoundError) as e:
            error = str(e)
    error, chosen = _broadcast_from_zero((error, str(chosen) if chosen else None))
    if error:
        raise CheckpointCorruptError(error) if "damaged" in error else ValueError(error)
    return Path(chosen) if chosen else None


def _resume_point(root: Path, resume_from: str | None) -> Path | None:
    found = list_checkpoints(root)
    if resume_from:
        names = [p.name for _, p in found]
        if resume_from.isdigit():
            versions = [p.name for step, p in found if step == int(resume_from)]
            if not versions:
                raise FileNotFoundError(f"--resume-from {resume_from}: no checkpoint of step {resume_from} in {root} "
                                        f"(have: {', '.join(names) or 'none'})")
            name = versions[-1]  # the newest version of the step: an unlearned one if there is one
        else:
            name = Path(resume_from).name
        latest = read_latest(root) if (root / "latest").exists() else None
        if latest is not None and (root / name).is_dir():
            lost = set(source_state(read_sink_manifest(latest)).disabled_sources) - set(
                source_state(read_sink_manifest(root / name)).disabled_sources)
            if lost:
                raise ValueError(f"--resume-from {name}: it predates the unlearning of {len(lost)} source(s) "
                                 f"{sorted(lost)[:5]} that {latest.name} has erased; its weights still hold them. "
                                 f"Unlearn them there first: nulls unlearn {root / name} --source-index ...")
        moved = roll_back(root, name, datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ"))
        for path in moved:
            logger.warning("rolled back: moved %s aside to %s", path.name, path.parent)
        print(f"rolled back to {name}" + (f"; {len(moved)} newer checkpoint(s) moved to {moved[0].parent}" if moved else ""),
              flush=True)
        return root / name
    latest = read_latest(root)
    if latest is None and found:
        raise ValueError(f"{root}: holds {len(found)} checkpoint(s) ({found[0][1].name} .. {found[-1][1].name}) but no "
                         f"'latest' pointer; resume one with --resume-from STEP (e.g. --resume-from {found[-1][0]}), "
                         "or use another train.run_dir to start afresh")
    order = [p for _, p in found]
    newer = [p.name for p in order[order.index(latest) + 1:]] if latest in order else []
    if newer and _saved_after_the_pointer(root, order[-1], newer):
        # A job killed between a save's rename and its `latest` update: the newer checkpoint is complete
        # (renamed only once every file and its digest were on disk; the load verifies them again).
        print(f"{order[-1].name} was saved after {latest.name} but the job ended before `latest` named it "
              f"(killed between the rename and the pointer update): resuming from {order[-1].name}", flush=True)
        update_latest(root, order[-1].name)
        return order[-1]
    if newer:
        # `latest` edited by hand to an older checkpoint: resuming would die at the first save (its
        # step exists) after the compute is spent, so the sanctioned roll back is asked for instead.
        raise ValueError(f"{root / 'latest'} names {latest.name}, but newer checkpoints exist ({', '.join(newer)}); "
                         f"to roll back, run with --resume-from {latest.name} (newer ones move aside, never deleted)")
    return latest


def _saved_after_the_pointer(root: Path, newest: Path, newer: list[str]) -> bool:
    """One checkpoint newer than ``latest``, completed after ``latest`` was last written: what a kill
    between a save's rename and its pointer update leaves (saves are one at a time). ``latest`` edited
    by hand to an older checkpoint was written after the newer one, and is refused instead."""
    return len(newer) == 1 and (root / "latest").stat().st_mtime_ns < newest.stat().st_mtime_ns


def verify_checkpoint(path: Path) -> None:
    """Collective: every file of ``path`` against its digest, each rank a share; raises
    :class:`CheckpointCorruptError` on every rank naming the files and the nearest older checkpoint
    that verifies. A checkpoint saved before digests were recorded is loaded with a warning."""
    if read_digests(path) is None:
        if dist.get_rank() == 0:
            logger.warning("%s has no digests.json (saved by an earlier version): its files cannot be verified", path)
        return
    problems: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(problems, verify_share(path, dist.get_rank(), dist.get_world_size()))
    found = [p for share in problems for p in share]
    if not found:
        return
    hint = None
    if dist.get_rank() == 0:
        older = [p for _, p in reversed(list_checkpoints(path.parent)) if p.resolve() != path.resolve()]
        good = nearest_good(older)
        hint = (f"the nearest checkpoint that verifies is {good.name}: resume from it with "
                f"`nulls train ... --resume-from {good.name}`" if good else "no other checkpoint of the run verifies")
    hint = _broadcast_from_zero(hint)
    listing = "\n  ".join(found[:10]) + (f"\n  ... and {len(found) - 10} more" if len(found) > 10 else "")
    raise CheckpointCorruptError(f"{path} is damaged; nothing was loaded:\n  {listing}\n{hint}")


def load_checkpoint(path: Path, engine: Engine, loader: PrefetchLoader) -> tuple[dict, SourceState]:
    """Collective: restore weights, moments, optimizer steps and this rank's loader position from
    ``path`` after checking every file's digest. Returns (train state, the sink manifest's source
    state: forgotten sources, provenance)."""
    verify_checkpoint(path)
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

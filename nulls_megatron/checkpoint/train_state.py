"""A training checkpoint's ``train_state.json`` (step, optimizer steps, loaders), read without torch or
Megatron: by the trainer, and by ``nulls train`` before it launches any process."""
from __future__ import annotations

from pathlib import Path

from .atomic import list_checkpoints, read_latest
from .json_files import read_versioned_json

CHECKPOINTS = "checkpoints"  # a run directory's checkpoints: <train.run_dir>/checkpoints/step-N
TRAIN_STATE = "train_state.json"
TRAIN_STATE_FORMAT = "nulls-train-state-1"


def read_train_state(path: Path) -> dict:
    return read_versioned_json(path / TRAIN_STATE, TRAIN_STATE_FORMAT,
                               missing=f"missing; {path} is not a complete training checkpoint")


def finished_checkpoint(root: Path, total_steps: int) -> tuple[Path, dict] | None:
    """The checkpoint ``root/latest`` names and its state, when it has reached ``total_steps``: the run
    is finished and rerunning it trains nothing. None otherwise, and when ``latest`` or the state cannot
    be read, or when a checkpoint newer than ``latest`` exists (the trainer then takes it or reports why,
    as on any resume)."""
    try:
        latest = read_latest(root)
        if latest is None or list_checkpoints(root)[-1][1] != latest:
            return None
        state = read_train_state(latest)
        if int(state["step"]) < total_steps:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return latest, state


def finished_message(checkpoint: Path, state: dict, total_steps: int) -> str:
    loss = state.get("loss")
    return (f"run already finished: step {state['step']} of {total_steps}, checkpoint {checkpoint}"
            + (f", last loss {loss:.4f}" if loss is not None else "") + " (raise train.steps to train further)")

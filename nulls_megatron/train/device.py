"""Batches on the compute device: one function for every engine.

The loader yields CPU tensors; the model lives on ``launch.env.compute_device()`` (its CUDA device
on a GPU node, the CPU otherwise). Each micro-batch is moved right before its forward, without
blocking (the copy overlaps the previous work when the loader's tensors are pinned).
"""
from __future__ import annotations

import dataclasses

import torch

from launch.env import compute_device

from .packing import PackedRows


def batch_to_device(batch: PackedRows, device: torch.device | None = None) -> PackedRows:
    """``batch`` with every tensor on ``device`` (default: this process's compute device)."""
    device = compute_device() if device is None else device
    moved = {f.name: getattr(batch, f.name).to(device, non_blocking=True)
             for f in dataclasses.fields(batch) if isinstance(getattr(batch, f.name), torch.Tensor)}
    if batch.routing is not None:
        moved["routing"] = batch.routing.to(device, non_blocking=True)
    return dataclasses.replace(batch, **moved)

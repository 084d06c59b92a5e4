"""What a data-parallel engine gives the trainer, whichever library is underneath.

An engine owns the model's gradient reduction across data-parallel replicas and the
optimizer. The trainer only ever calls the methods below, so the Megatron engine
(``megatron_ddp.py``) and the DeepSpeed engine (``deepspeed_zero.py``) are
interchangeable from the config (``train.engine``).

Gradient clipping is the engine's job and must work on CPU: ``step`` returns the
global gradient norm before clipping (the same number on every rank).

Optimizer state is exposed per parameter, *unsharded over data parallelism*: the
checkpoint code saves the backbone's moments through Megatron's dist_checkpointing
and the sink tables' moments beside their rows, without knowing how the engine
stores them (plain per-parameter tensors, or ZeRO's flat partitions).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterable

import torch

from ..packing import PackedRows

OPTIMIZER_MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's per-element state, in checkpoint order


class Engine(ABC):
    """One replica's model (this rank's TP/PP shard of it) and its optimizer."""

    #: the unwrapped NullsGPTModel of this pipeline stage (parameters, sinks, checkpoints)
    module: torch.nn.Module

    @abstractmethod
    def train_step(self, micro_batches: list[PackedRows], lr: float) -> tuple[float | None, float]:
        """Forward and backward over this rank's ``micro_batches`` of one global batch, reduce
        gradients across data-parallel replicas (and tied embeddings across pipeline stages),
        clip them, and take one AdamW step at learning rate ``lr``.

        The loss is the mean over micro-batches of each micro-batch's mean token loss, averaged over
        data-parallel replicas: DP=2 with one micro-batch each equals DP=1 with both.

        Returns (loss on the last pipeline stage / None elsewhere, global grad norm before clipping).
        """

    def sync_params(self) -> None:
        """Make ``module``'s parameters this step's on this rank, before they are read outside a forward
        (a checkpoint save). A no-op unless the engine defers its parameter all-gather to the next
        forward (Megatron's distributed optimizer with overlapped parameter gather)."""

    @abstractmethod
    def eval_loss(self, micro_batches: list[PackedRows]) -> float | None:
        """Mean loss without gradients (last pipeline stage; None elsewhere)."""

    @abstractmethod
    def optimizer_steps(self) -> int:
        """Optimizer steps taken (AdamW's bias-correction counter)."""

    @abstractmethod
    def moments(self, param: torch.nn.Parameter) -> dict[str, torch.Tensor]:
        """AdamW moments of this rank's ``param`` as full tensors of its shape (``OPTIMIZER_MOMENTS``),
        zeros before the first step. Collective over the data-parallel group for engines that
        shard optimizer state: every DP rank must call it for the same parameters in the same order."""

    @abstractmethod
    def load_moments(self, moments: Iterable[tuple[torch.nn.Parameter, dict[str, torch.Tensor]]], steps: int) -> None:
        """Restore the moments of every parameter (as ``moments`` returned them) and the step counter.
        Called once after the parameters themselves were loaded; collective like ``moments``."""

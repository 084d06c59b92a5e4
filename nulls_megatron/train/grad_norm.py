"""Global gradient norm over a tensor- and pipeline-parallel model, and clipping by it.

Each parameter's gradient is counted once over the whole model: tensor-parallel
shards are summed over the TP group, replicated parameters (norms, sink tables)
are counted on TP rank 0 only, and the tied output weight on the last pipeline
stage (a copy of the first stage's embedding, marked ``shared``) is skipped. The
squared sums are all-reduced over the model-parallel group, so every rank gets
the same norm. Expert-parallel parameters (sink-table shards, marked as Megatron
marks experts: ``allreduce = False``) hold different rows on each rank of the
expert-parallel group: their squares are summed over that group first. Plain
torch ops only, so it runs on CPU (Megatron's version asserts
CUDA tensors).
"""
from __future__ import annotations

from typing import Sequence

import torch
from megatron.core import parallel_state


def _counted_once(param: torch.nn.Parameter) -> bool:
    if getattr(param, "shared", False):
        return False
    return bool(getattr(param, "tensor_model_parallel", False)) or parallel_state.get_tensor_model_parallel_rank() == 0


def global_grad_norm(params: Sequence[torch.nn.Parameter], grads: Sequence[torch.Tensor | None]) -> float:
    """L2 norm of the full model's gradient (after data-parallel reduction), the same on every rank."""
    counted = [(param, grad) for param, grad in zip(params, grads) if grad is not None and _counted_once(param)]
    device = counted[0][1].device if counted else torch.device("cpu")

    def sum_of_squares(expert: bool) -> torch.Tensor:
        squares = [grad.detach().double().pow(2).sum() for param, grad in counted
                   if (getattr(param, "allreduce", True) is False) == expert]
        return torch.stack(squares).sum() if squares else torch.zeros((), dtype=torch.float64, device=device)

    # Summed where the gradients live, then one copy to the CPU (one device sync per step, not one per
    # parameter); the all-reduces run on the CPU side of the process group (gloo).
    parts = torch.stack([sum_of_squares(expert=False), sum_of_squares(expert=True)]).cpu()
    if torch.distributed.is_initialized() and parallel_state.get_expert_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(parts[1:], group=parallel_state.get_expert_model_parallel_group())
    total = parts.sum().reshape(1)
    if torch.distributed.is_initialized():
        # The model-parallel group spans TP x PP of one replica; DP replicas hold equal gradients.
        torch.distributed.all_reduce(total, group=parallel_state.get_model_parallel_group())
    return float(total.sqrt())


def clip_by_global_norm(grads: Sequence[torch.Tensor | None], norm: float, max_norm: float) -> float:
    """Scale ``grads`` in place so that their global norm is at most ``max_norm``; returns the factor."""
    factor = max_norm / (norm + 1e-6)
    if factor >= 1.0:
        return 1.0
    for grad in grads:
        if grad is not None:
            grad.mul_(factor)
    return factor


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient: training stops before the optimizer step, the save and the prune."""


def first_non_finite(named_grads: Sequence[tuple[str, torch.Tensor | None]]) -> str | None:
    """The name of the first parameter (in model order) whose gradient holds a NaN or an Inf."""
    for name, grad in named_grads:
        if grad is not None and not bool(torch.isfinite(grad).all()):
            return name
    return None

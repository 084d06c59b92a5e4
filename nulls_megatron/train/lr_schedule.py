"""Learning rate: linear warmup, then cosine decay to ``min_lr`` at the last step."""
from __future__ import annotations

import math

from ..config import OptimizerConfig


def learning_rate(step: int, total_steps: int, opt: OptimizerConfig) -> float:
    """The lr of optimizer step ``step`` (0-based) of ``total_steps``.

    Warmup reaches ``lr`` at step ``warmup_steps - 1`` (the first step already moves the
    weights, at ``lr / warmup_steps``); the cosine then falls from ``lr`` to exactly
    ``min_lr`` at the final step, and stays there if training runs longer.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < opt.warmup_steps:
        return opt.lr * (step + 1) / opt.warmup_steps
    decay_steps = total_steps - 1 - opt.warmup_steps
    if decay_steps <= 0:
        return opt.lr
    progress = min(1.0, (step - opt.warmup_steps) / decay_steps)
    return opt.min_lr + 0.5 * (opt.lr - opt.min_lr) * (1.0 + math.cos(math.pi * progress))

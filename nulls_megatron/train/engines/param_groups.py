"""AdamW parameter groups shared by every engine.

Three groups, because the three kinds of weight want different weight decay:
backbone matrices and embeddings decay (``optimizer.weight_decay``); norms do not
(decaying a gain towards 0 only fights the loss); sink tables use
``optimizer.sink_weight_decay``, which the config refuses unless it is 0, because
decoupled decay shrinks *every* row each step, including the rows of sources the
batch never saw, so a source would fade merely by not being sampled (and rows
that no batch uses would not keep their values: docs/training.md).
"""
from __future__ import annotations

from torch import nn

from ...config import OptimizerConfig
from ...sinks.table import SinkTable

GROUP_NAMES = ("decay", "no_decay", "sinks")


def sink_parameters(module: nn.Module) -> set[int]:
    """ids of the parameters that belong to sink tables."""
    return {id(p) for m in module.modules() if isinstance(m, SinkTable) for p in m.parameters(recurse=False)}


def classify_parameters(module: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """(name, parameter) of every trainable parameter of ``module``, by group name."""
    sinks = sink_parameters(module)
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {name: [] for name in GROUP_NAMES}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in sinks:
            groups["sinks"].append((name, param))
        elif param.dim() < 2:
            groups["no_decay"].append((name, param))
        else:
            groups["decay"].append((name, param))
    return groups


def adamw_param_groups(module: nn.Module, opt: OptimizerConfig) -> list[dict]:
    """torch.optim param-group dicts (empty groups left out), each tagged with its ``name``."""
    decay = {"decay": opt.weight_decay, "no_decay": 0.0, "sinks": opt.sink_weight_decay}
    return [
        {"name": name, "params": [p for _, p in named], "weight_decay": decay[name]}
        for name, named in classify_parameters(module).items()
        if named
    ]

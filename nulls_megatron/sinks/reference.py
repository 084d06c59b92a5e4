"""The masked-dense reference: the paper's way of computing a NULLs MLP.

Every one of the I = n_backbone + n_pool neurons is computed for every token
and multiplied by the token's mask. Slow by design (it is what the sparse path
replaces, METHOD.md weakness 1); tests compare the sparse path against it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .assignment import Assignment
from .routing import SinkMode, SinkRouting
from .table import SinkTable


def dense_weights(backbone_fc1: torch.Tensor, backbone_fc2: torch.Tensor, table: torch.Tensor):
    """Full W1, W3 [I, d] and W2 [d, I] with the backbone first, then the pool rows."""
    n_backbone = backbone_fc2.shape[1]
    w1 = torch.cat((backbone_fc1[:n_backbone], table[:, 0]))
    w3 = torch.cat((backbone_fc1[n_backbone:], table[:, 1]))
    w2 = torch.cat((backbone_fc2, table[:, 2].t()), dim=1)
    return w1, w3, w2


def neuron_mask(
    routing: SinkRouting, token_sources: torch.Tensor | None, sinks: SinkTable, num_tokens: int
) -> torch.Tensor:
    """The per-token multiplier of every neuron, [T, I], for the given mode.

    ``token_sources`` are the per-token ids the routing was built from (train:
    the tokens' own sources; route: the chosen ones); unused otherwise.
    """
    a: Assignment = sinks.assignment
    live = (~sinks.disabled).float()
    backbone = torch.full((num_tokens, sinks.n_backbone), sinks.backbone_scale(routing))
    if routing.mode is SinkMode.BACKBONE:
        pool = torch.zeros(num_tokens, a.n_pool)
    elif routing.mode is SinkMode.EXPECTED:
        pool = (live * sinks.p_mem).expand(num_tokens, -1)
    else:
        if token_sources is None:
            raise ValueError(f"mode {routing.mode.value} needs the per-token source ids")
        pool = a.dense_mask(token_sources.reshape(-1), layer=sinks.layer_number).float() * live
    return torch.cat((backbone, pool), dim=1)


def masked_dense_swiglu(
    x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """``W2 (silu(W1 x) * W3 x * mask)`` for tokens x [T, d] and mask [T, I]."""
    return (F.silu(x @ w1.t()) * (x @ w3.t()) * mask) @ w2.t()

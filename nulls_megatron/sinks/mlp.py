"""The NULLs MLP in plain torch: an always-on SwiGLU backbone plus a sink table.

This is the layer the method defines (METHOD.md section 1), usable without
Megatron: the Megatron-core layer (`nulls_megatron.model.nulls_mlp`) runs the
same sink table beside tensor-parallel backbone linears.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .assignment import Assignment
from .routing import SinkRouting
from .table import InitMethod, SinkTable, normal_init


class NullsMLP(nn.Module):
    """``y = W2 (silu(W1 x) * W3 x * m(s))`` computed as backbone + the live sinks only.

    ``backbone_fc1`` stacks W1 (gate) over W3 (up) of the backbone neurons,
    [2 * n_backbone, d], as Megatron's gated linear layer does.
    """

    def __init__(
        self,
        hidden_size: int,
        n_backbone: int,
        assignment: Assignment,
        layer_number: int = 0,
        init_method: InitMethod | None = None,
        output_init_method: InitMethod | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        init_method = init_method or normal_init(0.02)
        output_init_method = output_init_method or init_method
        self.n_backbone = n_backbone
        self.backbone_fc1 = nn.Parameter(torch.empty(2 * n_backbone, hidden_size, dtype=dtype, device=device))
        self.backbone_fc2 = nn.Parameter(torch.empty(hidden_size, n_backbone, dtype=dtype, device=device))
        with torch.no_grad():
            init_method(self.backbone_fc1)
            output_init_method(self.backbone_fc2)
        self.sinks = SinkTable(
            assignment, hidden_size, n_backbone, layer_number, init_method, output_init_method, dtype, device
        )

    def forward(self, x: torch.Tensor, routing: SinkRouting) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        fused = self.sinks.forward_with_backbone(flat, routing, self.backbone_fc1, self.backbone_fc2)
        if fused is not None:
            return fused.view(shape)
        gate, up = (flat @ self.backbone_fc1.t()).chunk(2, dim=-1)
        h = F.silu(gate) * up
        scale = self.sinks.backbone_scale(routing)
        if scale != 1.0:
            h = h * scale
        y = self.sinks(flat, routing, base=h @ self.backbone_fc2.t())
        return y.view(shape)

"""The sink table of one layer: the pool neurons, one row each, and their forward.

Row ``r`` of ``weight`` ([n_pool, 3, d]) holds pool neuron ``r``: its gate
weight (a row of W1), its up weight (a row of W3) and its down weight (a column
of W2). Storing a neuron's three slices together lets a source's ``k`` sinks be
gathered in one ``index_select`` (and sharded by rows across devices like an
embedding table). ``disabled`` marks the sinks of forgotten sources; they are
off in every mode. With the upstream assignment (a varying number of sinks per
source) a group's rows are padded with -1; padding gets a zero gate.

With an expert-parallel group (``expert_group`` of size P > 1) the table holds only rows
``[rank n_pool / P, (rank + 1) n_pool / P)`` (``row_start``, ``row_stop``; whole pool shards, so a
source's sinks all lie on one rank), and ``train`` / ``route`` forwards send each token to the rank
owning its source's sinks (``dispatch.AllToAllSinkDispatcher``) with the plan the caller built once
per forward (``SinkRouting.dispatch``).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from kernels.fused_nulls_swiglu import fused_nulls_swiglu
from kernels.grouped_sink_swiglu import grouped_sink_swiglu

import torch.distributed as dist

from .assignment import Assignment
from .dispatch import AllToAllSinkDispatcher
from .routing import SinkMode, SinkRouting

InitMethod = Callable[[torch.Tensor], object]


def normal_init(std: float) -> InitMethod:
    return lambda tensor: nn.init.normal_(tensor, mean=0.0, std=std)


class SinkTable(nn.Module):
    def __init__(
        self,
        assignment: Assignment,
        hidden_size: int,
        n_backbone: int,
        layer_number: int = 0,
        init_method: InitMethod | None = None,
        output_init_method: InitMethod | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        expert_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        if n_backbone < 1:
            raise ValueError(f"n_backbone must be >= 1, got {n_backbone}")
        self.assignment = assignment
        self.hidden_size = hidden_size
        self.n_backbone = n_backbone
        self.layer_number = layer_number
        self.dispatcher: AllToAllSinkDispatcher | None = None
        self.row_start, self.row_stop = 0, assignment.n_pool
        if expert_group is not None and dist.get_world_size(expert_group) > 1:
            self.dispatcher = AllToAllSinkDispatcher(assignment, expert_group)
            rows = self.dispatcher.rows_per_rank
            self.row_start, self.row_stop = self.dispatcher.rank * rows, (self.dispatcher.rank + 1) * rows
        held = self.row_stop - self.row_start
        self.weight = nn.Parameter(torch.empty(held, 3, hidden_size, dtype=dtype, device=device))
        self.register_buffer("disabled", torch.zeros(held, dtype=torch.bool, device=device))
        self._init_method = init_method or normal_init(0.02)
        self._output_init_method = output_init_method or self._init_method
        self.reset_parameters()

    @property
    def expert_parallel(self) -> bool:
        return self.dispatcher is not None

    def reset_parameters(self) -> None:
        with torch.no_grad():
            # Initialised as the whole [n_pool, d] W1, W3 and [d, n_pool] W2 would be, so a dense layer and
            # a sink table of the same seed hold the same numbers (and each expert-parallel shard its rows).
            n_pool, d, held = self.assignment.n_pool, self.hidden_size, slice(self.row_start, self.row_stop)
            like = dict(dtype=self.weight.dtype, device=self.weight.device)
            for slot, init in ((0, self._init_method), (1, self._init_method)):
                full = torch.empty(n_pool, d, **like)
                init(full)
                self.weight[:, slot] = full[held]
            w2 = torch.empty(d, n_pool, **like)
            self._output_init_method(w2)
            self.weight[:, 2] = w2.t()[held]

    @property
    def p_mem(self) -> float:
        return self.assignment.p_mem

    @property
    def p_gen(self) -> float:
        return self.assignment.p_gen_of(self.n_backbone)

    def backbone_scale(self, routing: SinkRouting) -> float:
        """Factor on the backbone activations: (p_gen + p_mem) / p_gen in backbone-only mode, else 1."""
        if routing.mode is SinkMode.BACKBONE:
            return (self.p_gen + self.p_mem) / self.p_gen
        return 1.0

    def forward(self, x: torch.Tensor, routing: SinkRouting, base: torch.Tensor) -> torch.Tensor:
        """``base`` [T, d] (the backbone output) plus the sinks' contribution for tokens ``x`` [T, d]."""
        if routing.mode is SinkMode.BACKBONE:
            return base
        if self.dispatcher is not None:
            return self._forward_expert_parallel(x, routing, base)
        if routing.mode is SinkMode.EXPECTED:
            gates = (~self.disabled).to(x.dtype) * self.p_mem
            w = self.weight
            h = nn.functional.silu(x @ w[:, 0].t()) * (x @ w[:, 1].t()) * gates
            return torch.addmm(base, h, w[:, 2])
        plan = routing.plan
        routing.check_tokens(x.shape[0])
        rows, gates = self._rows_and_gates(plan, x.dtype)
        # Under a data-parallel engine that keeps an fp32 gradient buffer per parameter (Megatron's DDP:
        # ``main_grad``), the rows' gradients go straight into it (kernels/grouped_sink_swiglu.py).
        return grouped_sink_swiglu(x, self.weight, plan.perm, plan.offsets, rows, gates, base=base, counts=plan.counts,
                                   grad_table_into=getattr(self.weight, "main_grad", None))

    def forward_with_backbone(self, x: torch.Tensor, routing: SinkRouting, fc1: torch.Tensor,
                              fc2: torch.Tensor) -> torch.Tensor | None:
        """The whole MLP on the CPU, the SwiGLU backbone (``fc1`` [2 n_backbone, d], gate rows over up
        rows; ``fc2`` [d, n_backbone]) and the live sinks (kernels/fused_nulls_swiglu.py: sources of
        ``FUSE_FROM`` tokens or more as one SwiGLU of width ``n_backbone + k`` each, the others' backbone
        over their tokens at once and their sinks grouped); None where the separate backbone and
        ``forward`` are the way: on a GPU (cuBLAS and the Triton kernels), with an expert-parallel pool,
        and in the expected and backbone-only modes."""
        if routing.mode not in (SinkMode.TRAIN, SinkMode.ROUTE) or self.dispatcher is not None or x.device.type != "cpu":
            return None
        plan = routing.plan
        routing.check_tokens(x.shape[0])
        rows, gates = self._rows_and_gates(plan, x.dtype)
        return fused_nulls_swiglu(x, fc1, fc2, self.weight, plan.perm, plan.offsets, rows, gates,
                                  grad_table_into=getattr(self.weight, "main_grad", None))

    def _rows_and_gates(self, plan, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Each group's pool rows [U, k] and their gates (0 for disabled sinks and padding)."""
        rows = plan.rows(self.assignment, self.layer_number)
        if self.assignment.variable_sinks:
            # Padding (-1) gathers row 0 under a zero gate: it adds exact zeros, forward and backward.
            live = rows >= 0
            rows = rows.clamp(min=0)
            return rows, (live & ~self.disabled[rows]).to(dtype)
        return rows, (~self.disabled[rows]).to(dtype)

    def _forward_expert_parallel(self, x: torch.Tensor, routing: SinkRouting, base: torch.Tensor) -> torch.Tensor:
        if routing.mode is SinkMode.EXPECTED:
            raise NotImplementedError("sink_mode 'expected' needs every row of the pool on one rank: evaluate the "
                                      "saved checkpoint, which loads at any expert-parallel size (nulls eval)")
        if routing.dispatch is None:
            raise RuntimeError("an expert-parallel sink table needs the forward's dispatch plan (SinkRouting.dispatch), "
                               "built once per forward by the model from the tokens' sources")
        return self.dispatcher.forward(x, self.weight, self.disabled, routing.dispatch, base=base,
                                       layer=self.layer_number, grad_table_into=getattr(self.weight, "main_grad", None))

    def extra_repr(self) -> str:
        a = self.assignment
        return (
            f"n_pool={a.n_pool}, k={'upstream' if a.variable_sinks else a.sinks_per_source}, "
            f"shards={a.n_shards}, d={self.hidden_size}, "
            f"layer={self.layer_number}, disabled={int(self.disabled.sum())}"
            + (f", rows={self.row_start}:{self.row_stop} of the expert-parallel pool" if self.expert_parallel else "")
        )


def scaled_init_std(init_std: float, num_layers: int) -> float:
    """Std of output projections in Megatron's default init: init_std / sqrt(2 * num_layers)."""
    return init_std / math.sqrt(2.0 * num_layers)

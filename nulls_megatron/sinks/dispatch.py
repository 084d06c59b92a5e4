"""Token dispatch for a sink pool sharded over expert-parallel ranks (METHOD.md section 5).

Rank ``r`` of an expert-parallel (EP) group of size ``P`` holds rows ``[r n_pool / P, (r + 1) n_pool / P)``
of a layer's sink table: the pool shards ``[r E / P, (r + 1) E / P)`` of the assignment (a source's
``k`` sinks all lie in one shard, so one rank owns all of them). A token's destination is a pure
function of its source: no router, no capacity factor, no dropped token, no balancing loss.

The stages, named as Megatron-core's ``MoETokenDispatcher``'s:

1. dispatch preprocess (local, once per micro-batch: ``plan``): each token's destination rank from
   its source; a stable permutation grouping tokens by destination (``kernels.destination_permutation``);
   the split sizes.
2. token dispatch (communicates): the split sizes (``all_to_all_single`` of P integers: the one host
   sync per micro-batch, in ``plan``), then the received tokens' source ids (``plan``) and, per layer,
   their rows.
3. dispatch postprocess (local, once per micro-batch: ``plan``): the received tokens grouped by source
   and each source's rows made local to the shard. The expert computation is the grouped sink SwiGLU
   on the local shard.
4. combine preprocess (local): nothing: results are already in the order they were received.
5. token combine (communicates): the results sent back with the splits reversed.
6. combine postprocess (local): un-permuted and added to the backbone output
   (``kernels.unpermute_rows``, the add fused).

Every step is differentiable (``all_to_all_single`` in an autograd function whose backward reverses
the splits) and deterministic
(permutations and fixed-order reductions, no atomics). Process groups are passed in.
``LocalSinkDispatcher`` is the same interface on one rank holding the whole table.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from kernels.destination_permutation import destination_permutation
from kernels.grouped_sink_swiglu import grouped_sink_swiglu
from kernels.permute_rows import permute_rows, unpermute_rows

from .assignment import SinkAssignment
from .routing import RoutingPlan


@dataclass
class DispatchPlan:
    """One micro-batch's dispatch, shared by every layer (the sources are the same in each)."""

    perm: torch.Tensor  # [T] this rank's tokens grouped by destination rank
    send_splits: list[int]  # tokens to each rank
    recv_splits: list[int]  # tokens from each rank
    received: RoutingPlan | None  # the received tokens grouped by source (None: nothing received)


class LocalSinkDispatcher:
    """The whole table on one rank: tokens grouped by source, no communication."""

    def __init__(self, assignment: SinkAssignment) -> None:
        self.assignment = assignment

    def plan(self, token_sources: torch.Tensor) -> DispatchPlan:
        n = token_sources.numel()
        identity = torch.arange(n, device=token_sources.device)
        received = RoutingPlan.from_token_sources(token_sources) if n else None
        return DispatchPlan(identity, [n], [n], received)

    def forward(self, x: torch.Tensor, table: torch.Tensor, disabled: torch.Tensor, plan: DispatchPlan,
                base: torch.Tensor | None = None, layer: int = 0) -> torch.Tensor:
        return _grouped(x, table, disabled, plan.received, self.assignment, layer, row_offset=0, base=base)


class AllToAllSinkDispatcher:
    """The table sharded by rows over ``group``; ``table`` passed to ``forward`` is this rank's shard."""

    def __init__(self, assignment: SinkAssignment, group: dist.ProcessGroup) -> None:
        self.assignment, self.group = assignment, group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        if assignment.n_shards % self.size:
            raise ValueError(f"the expert-parallel size {self.size} must divide nulls.pool_shards ({assignment.n_shards}): "
                             "a source's sinks must lie on one rank")
        self.shards_per_rank = assignment.n_shards // self.size
        self.rows_per_rank = assignment.n_pool // self.size

    def destination(self, token_sources: torch.Tensor) -> torch.Tensor:
        """The EP rank holding each token's sinks."""
        return self.assignment.shard_of(token_sources) // self.shards_per_rank

    def plan(self, token_sources: torch.Tensor) -> DispatchPlan:
        """Stages 1-3 for the ids: collective over the group (every rank calls it, tokens or not)."""
        token_sources = token_sources.reshape(-1)
        counts, _, perm = destination_permutation(self.destination(token_sources), self.size)
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        send_splits, recv_splits = torch.stack([counts, recv_counts]).tolist()  # the one host sync
        recv_sources = token_sources.new_empty(sum(recv_splits))
        dist.all_to_all_single(recv_sources, token_sources.index_select(0, perm), recv_splits, send_splits,
                               group=self.group)
        received = RoutingPlan.from_token_sources(recv_sources) if recv_sources.numel() else None
        return DispatchPlan(perm, send_splits, recv_splits, received)

    def forward(self, x: torch.Tensor, table: torch.Tensor, disabled: torch.Tensor, plan: DispatchPlan,
                base: torch.Tensor | None = None, layer: int = 0,
                grad_table_into: torch.Tensor | None = None) -> torch.Tensor:
        """Sink output of this rank's tokens ``x`` [T, d] (+ ``base``); collective over the group.
        ``grad_table_into``: as in ``kernels.grouped_sink_swiglu`` (the shard's ``main_grad``)."""
        if table.shape[0] != self.rows_per_rank:
            raise ValueError(f"this rank's table shard has {table.shape[0]} rows, expected {self.rows_per_rank}")
        y_recv = _grouped(self.dispatch(x, plan), table, disabled, plan.received, self.assignment, layer,
                          row_offset=self.rank * self.rows_per_rank, grad_table_into=grad_table_into)
        return self.combine(y_recv, plan, base)

    def dispatch(self, x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Stages 1-2 per layer: this rank's token rows grouped by destination and exchanged; returns the
        rows this rank received, in ``plan.received``'s token order."""
        return _AllToAll.apply(permute_rows(x, plan.perm), plan.send_splits, plan.recv_splits, self.group)

    def combine(self, y_recv: torch.Tensor, plan: DispatchPlan, base: torch.Tensor | None = None) -> torch.Tensor:
        """Stages 4-6: results of the received rows sent back, un-permuted, added to ``base``."""
        y_sorted = _AllToAll.apply(y_recv, plan.recv_splits, plan.send_splits, self.group)
        return unpermute_rows(y_sorted, plan.perm, base)


class _AllToAll(torch.autograd.Function):
    """Rows to each rank by ``send`` split sizes, rows from each rank by ``recv``; the backward sends
    the gradients back the same way reversed (uneven splits, empty ones included; gloo and NCCL)."""

    @staticmethod
    def forward(ctx, rows, send, recv, group):  # type: ignore[override]
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _all_to_all(rows, send, recv, group)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return _all_to_all(grad, ctx.recv, ctx.send, ctx.group), None, None, None


def _all_to_all(rows: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    out = rows.new_empty(sum(recv), *rows.shape[1:])
    dist.all_to_all_single(out, rows.contiguous(), recv, send, group=group)
    return out


def _grouped(x: torch.Tensor, table: torch.Tensor, disabled: torch.Tensor, received: RoutingPlan | None,
             assignment: SinkAssignment, layer: int, row_offset: int, base: torch.Tensor | None = None,
             grad_table_into: torch.Tensor | None = None) -> torch.Tensor:
    if received is None:  # no token: an empty result that still carries the graph (collectives run in backward)
        return x * 0 if base is None else base + x * 0
    rows = received.rows(assignment, layer) - row_offset
    gates = (~disabled[rows]).to(x.dtype)
    return grouped_sink_swiglu(x, table, received.perm, received.offsets, rows, gates, base=base, counts=received.counts,
                               grad_table_into=grad_table_into)

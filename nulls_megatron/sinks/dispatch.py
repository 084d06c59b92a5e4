"""Token dispatch for a sink pool sharded over expert-parallel ranks (METHOD.md section 5).

Rank ``r`` of an expert-parallel (EP) group of size ``P`` holds rows ``[r n_pool / P, (r + 1) n_pool / P)``
of a layer's sink table: the pool shards ``[r E / P, (r + 1) E / P)`` of the assignment (a source's
``k`` sinks all lie in one shard, so one rank owns all of them). A token's destination is a pure
function of its source: no router, no capacity factor, no dropped token, no balancing loss.

The stages, named as Megatron-core's ``MoETokenDispatcher``'s:

1. dispatch preprocess (local, once per micro-batch: ``plan``): each token's destination rank from
   its source; a stable permutation grouping tokens by destination (``kernels.destination_permutation``)
   and, within a destination, by source; the split sizes.
2. token dispatch (communicates): the split sizes (``all_to_all_single`` of P integers: the one host
   sync per micro-batch, in ``plan``), then the received tokens' source ids (``plan``) and, per layer,
   their rows. Tokens whose sinks their own rank holds are gathered straight into place and skip the
   collective (their split is 0 in it).
3. dispatch postprocess (local, once per micro-batch: ``plan``): the received tokens arrive in runs
   of one source (a source sent by two ranks is two runs), so they need no permutation; each run's
   rows are made local to the shard. The expert computation is the grouped sink SwiGLU on the local
   shard, over the runs in place.
4. combine preprocess (local): nothing: results are already in the order they were received.
5. token combine (communicates): the results of other ranks' tokens sent back with the splits
   reversed; this rank's own copied into place.
6. combine postprocess (local): un-permuted and added to the backbone output
   (``kernels.permute_rows.scatter``, the add fused). One row permutation on each side of the
   exchange per layer and direction, none on the owner.

Every step is differentiable (dispatch and combine are autograd functions, each one's backward the
other) and deterministic (permutations and fixed-order reductions, no atomics). Process groups are passed in.
``LocalSinkDispatcher`` is the same interface on one rank holding the whole table.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from kernels.destination_permutation import destination_permutation
from kernels.grouped_sink_swiglu import grouped_sink_swiglu
from kernels.permute_rows import gather, scatter

from .assignment import SinkAssignment
from .routing import RoutingPlan


@dataclass
class DispatchPlan:
    """One micro-batch's dispatch, shared by every layer (the sources are the same in each).

    ``perm`` orders this rank's tokens as they leave it: first the ``local`` ones whose sinks this rank
    holds itself (they never enter the collective), then those for each other rank in rank order;
    each destination's tokens by source. The rows a rank computes are laid out the same way: its own
    ``local`` tokens first, then those received from each other rank in rank order (``received``).
    """

    perm: torch.Tensor  # [T]
    send_splits: list[int]  # tokens to each rank, this rank's own (``local``) included
    recv_splits: list[int]  # tokens from each rank, this rank's own included
    received: RoutingPlan | None  # the rows this rank computes, in runs of one source (None: no rows)
    rank: int = 0

    @property
    def local(self) -> int:
        return self.send_splits[self.rank]

    def remote(self, splits: list[int]) -> list[int]:
        """``splits`` with this rank's own entry 0: what goes through the all-to-all."""
        return [0 if r == self.rank else n for r, n in enumerate(splits)]


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
        """Stages 1-3 for the ids: collective over the group (every rank calls it, tokens or not).

        Tokens are ordered by destination and, within a destination, by source (stably): what each
        rank computes is then already in runs of one source per sender, with no second permutation
        into source groups and none back. The tokens a rank keeps go first and skip the collective."""
        token_sources = token_sources.reshape(-1)
        by_source = torch.argsort(token_sources, stable=True)
        counts, _, by_destination = destination_permutation(self.destination(token_sources[by_source]), self.size)
        grouped = by_source[by_destination]  # stable in destination: each destination's tokens stay by source
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        send_splits, recv_splits = torch.stack([counts, recv_counts]).tolist()  # the one host sync
        own = slice(sum(send_splits[:self.rank]), sum(send_splits[:self.rank + 1]))
        perm = torch.cat([grouped[own], grouped[:own.start], grouped[own.stop:]])
        plan = DispatchPlan(perm, send_splits, recv_splits, None, rank=self.rank)
        recv_sources = _send(token_sources.unsqueeze(1), plan, self.group, impl="torch").squeeze(1)
        plan.received = RoutingPlan.from_source_runs(recv_sources) if recv_sources.numel() else None
        return plan

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
        rows this rank computes, in ``plan.received``'s token order."""
        return _Dispatch.apply(x, plan, self.group)

    def combine(self, y_recv: torch.Tensor, plan: DispatchPlan, base: torch.Tensor | None = None) -> torch.Tensor:
        """Stages 4-6: results of the computed rows sent back, un-permuted, added to ``base``."""
        return _Combine.apply(y_recv, plan, base, self.group)


def _send(rows: torch.Tensor, plan: DispatchPlan, group, impl: str = "auto") -> torch.Tensor:
    """This rank's token rows [T, H] to the rows the ranks compute: the local ones gathered straight into
    place, the rest gathered by destination and sent by one ``all_to_all_single`` (this rank's own split
    0), received into place after them."""
    local = plan.local
    send, recv = plan.remote(plan.send_splits), plan.remote(plan.recv_splits)
    out = rows.new_empty(local + sum(recv), rows.shape[1])
    gather(rows, plan.perm[:local], impl, out=out[:local])
    outgoing = gather(rows, plan.perm[local:], impl)
    dist.all_to_all_single(out[local:], outgoing, recv, send, group=group)
    return out


def _receive(computed: torch.Tensor, plan: DispatchPlan, group, base: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse of ``_send``: computed rows back to the ranks their tokens came from and into token
    order, plus ``base``."""
    local = plan.local
    send, recv = plan.remote(plan.send_splits), plan.remote(plan.recv_splits)
    in_perm_order = computed.new_empty(plan.perm.numel(), computed.shape[1])
    in_perm_order[:local].copy_(computed[:local])
    dist.all_to_all_single(in_perm_order[local:], computed[local:].contiguous(), send, recv, group=group)
    return scatter(in_perm_order, plan.perm, base)


class _Dispatch(torch.autograd.Function):
    """Stages 1-2 (``_send``); the backward sends the gradients back the same way reversed."""

    @staticmethod
    def forward(ctx, x, plan, group):  # type: ignore[override]
        ctx.plan, ctx.group = plan, group
        return _send(x, plan, group)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return _receive(grad, ctx.plan, ctx.group), None, None


class _Combine(torch.autograd.Function):
    """Stages 4-6 (``_receive``, the add of ``base`` fused); the backward is ``_send``."""

    @staticmethod
    def forward(ctx, y_recv, plan, base, group):  # type: ignore[override]
        ctx.plan, ctx.group, ctx.has_base = plan, group, base is not None
        return _receive(y_recv, plan, group, base)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        grad = grad.contiguous()
        grad_y = _send(grad, ctx.plan, ctx.group) if ctx.needs_input_grad[0] else None
        return grad_y, None, grad if ctx.has_base else None, None


def _grouped(x: torch.Tensor, table: torch.Tensor, disabled: torch.Tensor, received: RoutingPlan | None,
             assignment: SinkAssignment, layer: int, row_offset: int, base: torch.Tensor | None = None,
             grad_table_into: torch.Tensor | None = None) -> torch.Tensor:
    if received is None:  # no token: an empty result that still carries the graph (collectives run in backward)
        return x * 0 if base is None else base + x * 0
    rows = received.rows(assignment, layer) - row_offset
    gates = (~disabled[rows]).to(x.dtype)
    return grouped_sink_swiglu(x, table, received.perm, received.offsets, rows, gates, base=base, counts=received.counts,
                               grad_table_into=grad_table_into)

"""Which sinks each token uses in a forward pass: the routing plan and the modes.

A forward pass over a batch is routed once, at the model's entry, and every
NULLs MLP of the model reads the same :class:`SinkRouting`. In ``train`` and
``route`` modes it carries a :class:`RoutingPlan`: tokens grouped by source
(one stable sort), the unique sources, and their sink rows, computed once per
batch and layer salt and then reused by every layer.

Modes (METHOD.md section 2):
- ``train``: each token uses the backbone and the sinks of its own source.
- ``route``: each token uses the sinks of a source chosen by the caller (one
  for all tokens, or one per token, e.g. the nearest surviving source).
- ``expected``: every sink is on, scaled by its expected mask ``p_mem = k / n_pool``.
- ``backbone``: sinks off, backbone scaled by ``(p_gen + p_mem) / p_gen`` with
  ``p_gen = n_backbone / (n_backbone + n_pool)``.
Disabled sinks (forgotten sources) are off in every mode.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from .assignment import Assignment


class SinkMode(str, enum.Enum):
    TRAIN = "train"
    ROUTE = "route"
    EXPECTED = "expected"
    BACKBONE = "backbone"


@dataclass
class RoutingPlan:
    """Tokens of one batch grouped by source.

    ``perm`` sorts the flattened tokens so that each source's tokens are
    contiguous; group ``u`` is ``perm[offsets[u]:offsets[u+1]]`` and belongs to
    ``sources[u]``. ``perm`` is None when the tokens are already grouped.
    """

    sources: torch.Tensor
    offsets: list[int]
    perm: torch.Tensor | None
    counts: torch.Tensor | None = None  # tokens per group, on the tokens' device (the same numbers as offsets)
    _rows: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def from_token_sources(cls, token_sources: torch.Tensor) -> "RoutingPlan":
        token_sources = token_sources.reshape(-1)
        if token_sources.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"source ids must be int32 or int64, got {token_sources.dtype}")
        if token_sources.numel() == 0:
            raise ValueError("cannot route an empty batch")
        if int(token_sources.min()) < 0:
            pos = int((token_sources < 0).nonzero()[0])
            raise ValueError(f"source id {int(token_sources[pos])} at token {pos} is negative")
        sources, inverse, counts = torch.unique(token_sources, return_inverse=True, return_counts=True)
        offsets = [0] + torch.cumsum(counts, 0).tolist()
        already_grouped = bool((inverse[1:] >= inverse[:-1]).all())
        perm = None if already_grouped else torch.argsort(inverse, stable=True)
        return cls(sources=sources, offsets=offsets, perm=perm, counts=counts)

    @classmethod
    def from_source_runs(cls, token_sources: torch.Tensor) -> "RoutingPlan":
        """Tokens that already come in runs of one source, each run its own group and no permutation
        (a source may have several runs: its rows are then used by several groups)."""
        token_sources = token_sources.reshape(-1)
        if token_sources.numel() == 0:
            raise ValueError("cannot route an empty batch")
        sources, counts = torch.unique_consecutive(token_sources, return_counts=True)
        return cls(sources=sources, offsets=[0] + torch.cumsum(counts, 0).tolist(), perm=None, counts=counts)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "RoutingPlan":
        """The plan with its tensors (and the rows already looked up) on ``device``; the group offsets
        stay Python ints, so a plan built on the host routes a forward on the device without a sync."""
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return RoutingPlan(sources=move(self.sources), offsets=self.offsets,
                           perm=None if self.perm is None else move(self.perm),
                           counts=None if self.counts is None else move(self.counts),
                           _rows={key: move(rows) for key, rows in self._rows.items()})

    @property
    def num_tokens(self) -> int:
        return self.offsets[-1]

    def group_sizes(self) -> list[int]:
        return [hi - lo for lo, hi in zip(self.offsets[:-1], self.offsets[1:])]

    def rows(self, assignment: Assignment, layer: int) -> torch.Tensor:
        """Global pool rows [U, k] of each group's source, cached per batch.

        Without per-layer sinks every layer shares one entry of the cache.
        """
        key = (assignment, layer if assignment.per_layer else 0)
        if key not in self._rows:
            self._rows[key] = assignment.sinks_of(self.sources, layer=layer)
        return self._rows[key]


@dataclass
class SinkRouting:
    """How the sinks are used in one forward pass; build with the class methods. With an
    expert-parallel pool, ``dispatch`` is the forward's ``dispatch.DispatchPlan`` (tokens to the ranks
    owning their sources' sinks), built once by the model and shared by every layer."""

    mode: SinkMode
    plan: RoutingPlan | None = None
    dispatch: object | None = None

    @classmethod
    def train(cls, token_sources: torch.Tensor) -> "SinkRouting":
        return cls(SinkMode.TRAIN, RoutingPlan.from_token_sources(token_sources))

    @classmethod
    def route(cls, route_sources: torch.Tensor | int, like: torch.Tensor | None = None) -> "SinkRouting":
        """Route tokens to chosen sources: a per-token tensor, or one source id
        for every token of ``like`` (a tensor shaped as the tokens)."""
        if isinstance(route_sources, int):
            if like is None:
                raise ValueError("route(source_id) needs `like`, a tensor shaped as the tokens")
            route_sources = torch.full(like.shape, route_sources, dtype=torch.int64, device=like.device)
        return cls(SinkMode.ROUTE, RoutingPlan.from_token_sources(route_sources))

    @classmethod
    def expected(cls) -> "SinkRouting":
        return cls(SinkMode.EXPECTED)

    @classmethod
    def backbone_only(cls) -> "SinkRouting":
        return cls(SinkMode.BACKBONE)

    def check_tokens(self, num_tokens: int) -> None:
        if self.plan is not None and self.plan.num_tokens != num_tokens:
            raise ValueError(
                f"routing was built for {self.plan.num_tokens} tokens but the layer got {num_tokens}: "
                "source ids must have the same shape as the input ids"
            )

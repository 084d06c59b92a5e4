"""The authors' sink assignment (``batch_seqtied_mask_mult``), kept only to run their checkpoints.

METHOD.md section 4, weakness 2: upstream, source ``s`` owns pool neuron ``j`` when::

    c       = id * 2**16                              # int64, wraps
    powers  = torch.pow(a, arange(n_pool)) mod M      # int64 pow WRAPS (mod 2**64, signed) before the mod
    v[j]    = (c * powers[j]) mod M                   # the product wraps too; mod is floor-mod (>= 0)
    live[j] = float32(v[j]) / M < p_mem               # true division in float32

with ``a = 1588635695``, ``M = 4294967291`` (2**32 - 5) and ``id`` the upstream source id (Wikipedia:
title index + 49152, the vocabulary size). Quirks that must be kept, because the released weights
were trained against them: the powers wrap in int64 (so this is NOT modular exponentiation), the
number of sinks per source is Bernoulli (70-124 at the paper's shape, any count in general, 0
included), id 0 owns every neuron, and the test is in float32 (``float32(M) == 2**32``, so the
division is an exact power-of-two scaling on every device; ``p_mem`` is compared in float32). The
same neurons are used in every layer.

:class:`UpstreamAssignment` exposes this with the interface the sink core uses
(:class:`~.assignment.SinkAssignment`'s), mapping our dense source index ``s`` to the upstream id
``s + id_offset``. Rows per source vary, so ``sinks_of`` returns ``[B, W]`` rows, ascending, padded
on the right with :data:`PAD_ROW` (-1) to the batch's widest source (at least one column):
consumers gather ``max(row, 0)`` with a zero gate for padding (the grouped kernel then adds exact
zeros, forward and backward), and drop ``-1`` wherever rows are counted.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["PAD_ROW", "UPSTREAM_A", "UPSTREAM_M", "UPSTREAM_BASE", "UpstreamAssignment", "upstream_mask"]

UPSTREAM_A = 1588635695
UPSTREAM_M = 4294967291
UPSTREAM_BASE = 2**16
PAD_ROW = -1
ID_LIMIT = 2**32
_ELEMENTS = 1 << 22  # ids x pool entries per chunk: four int64 temporaries of ~32 MB


def _powers(n_pool: int) -> torch.Tensor:
    # torch.pow on an int64 tensor wraps like the authors' code did; computed on CPU as theirs was.
    return torch.remainder(torch.pow(UPSTREAM_A, torch.arange(n_pool, dtype=torch.int64)), UPSTREAM_M)


def upstream_mask(ids: torch.Tensor, n_pool: int, p_mem: float) -> torch.Tensor:
    """bool [B, n_pool]: the pool neurons live for each upstream id (the formula above, in torch int64)."""
    if ids.dtype != torch.int64 or ids.dim() != 1:
        raise ValueError(f"upstream ids must be a 1-D int64 tensor, got {ids.dtype} {tuple(ids.shape)}")
    powers = _powers(n_pool).to(ids.device)
    out = torch.empty(len(ids), n_pool, dtype=torch.bool, device=ids.device)
    step = max(1, _ELEMENTS // max(n_pool, 1))
    threshold = torch.tensor(p_mem, dtype=torch.float32, device=ids.device)
    for lo in range(0, len(ids), step):
        c = ids[lo:lo + step] * UPSTREAM_BASE
        v = torch.remainder(c.unsqueeze(-1) * powers, UPSTREAM_M)
        torch.lt(v.to(torch.float32) / UPSTREAM_M, threshold, out=out[lo:lo + step])
    return out


def _rows_of_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    """Live columns of each row, ascending, padded with PAD_ROW to ``width``: int64 [B, width]."""
    r, c = mask.nonzero(as_tuple=True)  # row-major: columns ascend within a row
    counts = mask.sum(1)
    start = torch.cumsum(counts, 0) - counts
    out = torch.full((mask.shape[0], width), PAD_ROW, dtype=torch.int64)
    out[r, torch.arange(len(r)) - start[r]] = c
    return out


@dataclass(frozen=True)
class UpstreamAssignment:
    """The upstream hash as an assignment (module doc). Not sharded, the same sinks in every layer:
    ``n_shards`` and ``per_layer`` are fixed fields so that every reader of a sink manifest finds them.

    ``p_mem`` is the Bernoulli rate (and the expected-mode constant), ``p_gen`` the backbone fraction
    the backbone-only mode scales by, ``(p_gen + p_mem) / p_gen``, exactly as upstream.
    """

    n_pool: int
    p_mem: float
    p_gen: float
    id_offset: int = 0
    scheme: str = "upstream"
    n_shards: int = 1
    per_layer: bool = False

    variable_sinks = True  # class attribute, not a field: rows per source vary (padded with PAD_ROW)

    def __post_init__(self) -> None:
        for name in ("n_pool", "id_offset"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ValueError(f"{name} must be an int, got {v!r}")
        if not 1 <= self.n_pool < ID_LIMIT:
            raise ValueError(f"n_pool must be in [1, 2**32), got {self.n_pool}")
        for name in ("p_mem", "p_gen"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
                raise ValueError(f"{name} must be a number in (0, 1), got {v!r}")
        if not 0 <= self.id_offset < 2**62:
            raise ValueError(f"id_offset must be in [0, 2**62), got {self.id_offset}")
        if self.scheme != "upstream":
            raise ValueError(f"scheme must be 'upstream', got {self.scheme!r}")
        if self.n_shards != 1 or self.per_layer:
            raise ValueError("the upstream assignment has one pool shard and the same sinks in every layer "
                             f"(n_shards=1, per_layer=False), got n_shards={self.n_shards}, per_layer={self.per_layer}")

    @property
    def shard_size(self) -> int:
        return self.n_pool

    @property
    def max_sinks(self) -> int:
        """Most sinks one source can own: the whole pool (upstream id 0 owns every neuron)."""
        return self.n_pool

    def p_gen_of(self, n_backbone: int) -> float:
        """The backbone fraction of the backbone-only scale: upstream's configured ``p_gen``."""
        return float(self.p_gen)

    # ---- numpy level (the unlearning tools) ------------------------------------------------------
    def _upstream_ids(self, ids: np.ndarray) -> torch.Tensor:
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu" or ids.ndim != 1:
            raise ValueError(f"sources must be a 1-D integer array, got {ids.dtype} {ids.shape}")
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= ID_LIMIT):
            raise ValueError(f"sources must be in [0, 2**32), got ids from {int(ids.min())} to {int(ids.max())}")
        return torch.from_numpy(ids.astype(np.int64)) + self.id_offset

    def shard_of_np(self, ids: np.ndarray) -> np.ndarray:
        return np.zeros(len(self._upstream_ids(ids)), dtype=np.int64)

    def mask_np(self, ids: np.ndarray) -> np.ndarray:
        """bool [B, n_pool], True on each source's sinks."""
        return upstream_mask(self._upstream_ids(ids), self.n_pool, self.p_mem).numpy()

    def sinks_of_np(self, ids: np.ndarray, layer: int = 0) -> np.ndarray:
        """Pool rows of each source, int64 [B, W], ascending, padded with PAD_ROW (W >= 1)."""
        up = self._upstream_ids(ids)
        step = max(1, _ELEMENTS // self.n_pool)
        masks = [upstream_mask(up[lo:lo + step], self.n_pool, self.p_mem) for lo in range(0, len(up), step)]
        width = max([1] + [int(m.sum(1).max()) for m in masks if len(m)])
        rows = [_rows_of_mask(m, width) for m in masks]
        return torch.cat(rows).numpy() if rows else np.zeros((0, width), dtype=np.int64)

    def usage_counts(self, n_sources: int, layer: int = 0, chunk: int = 1 << 12,
                     progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Stream ids 0..n_sources-1; return (sources per shard [1], sources per sink [n_pool])."""
        sink_counts = torch.zeros(self.n_pool, dtype=torch.int64)
        for start in range(0, n_sources, chunk):
            ids = np.arange(start, min(start + chunk, n_sources), dtype=np.int64)
            sink_counts += upstream_mask(self._upstream_ids(ids), self.n_pool, self.p_mem).sum(0)
        return np.array([n_sources], dtype=np.int64), sink_counts.numpy()

    # ---- torch level (the model) -----------------------------------------------------------------
    @staticmethod
    def _to_numpy(sources: torch.Tensor) -> np.ndarray:
        if not isinstance(sources, torch.Tensor) or sources.dtype not in (torch.int32, torch.int64) or sources.dim() != 1:
            raise ValueError(f"sources must be a 1-D int32/int64 tensor, got {sources!r:.80}")
        return sources.detach().cpu().numpy()

    def shard_of(self, sources: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(self._to_numpy(sources)), dtype=torch.int64, device=sources.device)

    def sinks_of(self, sources: torch.Tensor, layer: int = 0) -> torch.Tensor:
        """Pool rows of each source, int64 [B, W], ascending, padded with PAD_ROW, on the input's device."""
        return torch.from_numpy(self.sinks_of_np(self._to_numpy(sources), layer)).to(sources.device)

    def dense_mask(self, sources: torch.Tensor, layer: int = 0) -> torch.Tensor:
        """bool [B, n_pool], True on each source's sinks."""
        return torch.from_numpy(self.mask_np(self._to_numpy(sources))).to(sources.device)

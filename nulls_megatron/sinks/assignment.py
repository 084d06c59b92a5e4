"""Deterministic assignment of sources to pool shards and sink neurons.

Every source (a dense integer id ``s`` in ``[0, 2**32)``) is sent to exactly one of
``E = n_shards`` equal shards of the sink pool and owns exactly ``k`` distinct sink
neurons inside that shard. Everything is a pure function of ``(s, seed, layer)``
built from unsigned 32-bit arithmetic, so any language can reproduce it bit for bit.

Algorithm (all arithmetic on unsigned 32-bit integers, i.e. modulo 2**32)::

    mix32(x):                      # "lowbias32" finaliser (C. Wellons)
        x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16
    H(w0, w1, ..., wn):            # keyed counter-based hash of 32-bit words
        h = 0x6A09E667
        for w in (w0, ..., wn): h = mix32(h ^ (w * 0x9E3779B9))
        return h
    reduce(h, n) = (h * n) >> 32   # Lemire; exact in 64-bit unsigned, h*n < 2**64

    P = n_pool // E,  TAG_SHARD = 0x53485244 ("SHRD"),  TAG_SINK = 0x53494E4B ("SINK")
    shard(s) = (s % E + reduce(H(seed, TAG_SHARD, 0, s // E, 0), E)) % E
    L = layer + 1 if per_layer else 0
    c_i(s) = reduce(H(seed, TAG_SINK, L, s, i), P)        for i = 0, 1, 2, ...
    sinks(s) = sorted(first k distinct values of c_0, c_1, ... in counter order)
               + shard(s) * P                              # global pool rows

Guarantees: each block of ``E`` consecutive ids ``bE .. bE+E-1`` visits every shard
exactly once (a rotation of the block), so per-shard counts differ by at most one
for any number of sources. Shards never depend on the layer. Each source gets
exactly ``k`` distinct rows; the result does not depend on batching, chunking or the
number of candidates drawn at once. Words are multiplied by the odd constant
0x9E3779B9 before absorption so that the candidate streams of two sources are never
near-translates of each other (with plain ``h ^ i`` two sources whose states differ
in the low bits would draw the same candidate set in another order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch

from .upstream import UpstreamAssignment

__all__ = ["Assignment", "SinkAssignment", "assignment_from_config", "assignment_from_dict", "mix32", "hash_words",
           "TAG_SHARD", "TAG_SINK"]

MASK32 = 0xFFFFFFFF
IV = 0x6A09E667
GOLDEN = 0x9E3779B9
M1, M2 = 0x7FEB352D, 0x846CA68B
TAG_SHARD = 0x53485244
TAG_SINK = 0x53494E4B
ID_LIMIT = 2**32
# ~2k sources x ~110 candidates keeps the working set in L2: 1.4x faster than 8k chunks here.
_CHUNK = 2048


def _mix32_int(x: int) -> int:
    x ^= x >> 16
    x = (x * M1) & MASK32
    x ^= x >> 15
    x = (x * M2) & MASK32
    return x ^ (x >> 16)


def _absorb_int(h: int, w: int) -> int:
    return _mix32_int(h ^ ((w * GOLDEN) & MASK32))


def mix32(x: np.ndarray) -> np.ndarray:
    """lowbias32 on a uint32 array, in place (numpy wraps unsigned arithmetic mod 2**32)."""
    x ^= x >> 16
    x *= np.uint32(M1)
    x ^= x >> 15
    x *= np.uint32(M2)
    x ^= x >> 16
    return x


def _absorb(h: np.ndarray | int, w: np.ndarray | int) -> np.ndarray | int:
    if not isinstance(h, np.ndarray) and not isinstance(w, np.ndarray):
        return _absorb_int(int(h), int(w))
    # 1-D operands keep numpy in array arithmetic (wraps silently, no scalar overflow
    # warnings); the xor allocates a fresh array, so mixing it in place is safe.
    x = np.atleast_1d(np.asarray(w, dtype=np.uint32)) * np.uint32(GOLDEN)
    return mix32(x ^ np.atleast_1d(np.asarray(h, dtype=np.uint32)))


def hash_words(*words: int | np.ndarray) -> np.ndarray | int:
    """``H(w0, ..., wn)`` from the module docstring; words may be ints or uint32 arrays."""
    h: np.ndarray | int = IV
    for w in words:
        h = _absorb(h, w)
    return h


def _reduce(h: np.ndarray, n: int) -> np.ndarray:
    return ((h.astype(np.uint64) * np.uint64(n)) >> np.uint64(32)).astype(np.uint32)


def _check_ids(ids: np.ndarray) -> np.ndarray:
    """Validate source ids and return them as uint32."""
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise ValueError(f"sources must have an integer dtype, got {ids.dtype}")
    if ids.ndim != 1:
        raise ValueError(f"sources must be 1-D, got shape {tuple(ids.shape)}")
    bad = np.zeros(ids.shape, dtype=bool)
    if ids.dtype.kind == "i":
        bad |= ids < 0
    if ids.dtype.itemsize > 4:
        bad |= ids >= ID_LIMIT
    if bad.any():
        pos = int(np.argmax(bad))
        raise ValueError(f"sources: id {int(ids[pos])} at position {pos} is outside [0, 2**32)")
    return ids.astype(np.uint32, copy=False)


def _candidate_count(k: int, p: int) -> int:
    """Draws that almost surely contain k distinct values out of p (mean + 6 sd + 4)."""
    j = np.arange(k, dtype=np.float64)
    q = (p - j) / p  # success probability of the (j+1)-th new value
    mean, var = float(np.sum(1.0 / q)), float(np.sum((1.0 - q) / q**2))
    return min(max(k, math.ceil(mean + 6.0 * math.sqrt(var)) + 4), ID_LIMIT)


@dataclass(frozen=True)
class SinkAssignment:
    """Which shard and which ``k`` sink rows of the pool each source owns (see module doc)."""

    n_pool: int
    sinks_per_source: int
    n_shards: int = 1
    seed: int = 0
    per_layer: bool = False

    def __post_init__(self) -> None:
        for name in ("n_pool", "sinks_per_source", "n_shards", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ValueError(f"{name} must be an int, got {v!r}")
        if not isinstance(self.per_layer, (bool, np.bool_)):
            raise ValueError(f"per_layer must be a bool, got {self.per_layer!r}")
        if self.n_shards < 1:
            raise ValueError(f"n_shards must be >= 1, got {self.n_shards}")
        if not 1 <= self.n_pool < ID_LIMIT:
            raise ValueError(f"n_pool must be in [1, 2**32), got {self.n_pool}")
        if self.n_pool % self.n_shards:
            raise ValueError(f"n_pool ({self.n_pool}) must be divisible by n_shards ({self.n_shards})")
        if self.sinks_per_source < 1:
            raise ValueError(f"sinks_per_source (k) must be >= 1, got {self.sinks_per_source}")
        if self.sinks_per_source > self.shard_size:
            raise ValueError(
                f"sinks_per_source (k) = {self.sinks_per_source} exceeds the shard size "
                f"n_pool // n_shards = {self.shard_size}"
            )
        if not 0 <= self.seed < ID_LIMIT:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")

    variable_sinks = False  # class attribute, not a field: exactly k rows per source, never padded

    @property
    def shard_size(self) -> int:
        return self.n_pool // self.n_shards

    @property
    def max_sinks(self) -> int:
        """Rows per source (the width of ``sinks_of``): k."""
        return self.sinks_per_source

    @property
    def p_mem(self) -> float:
        """The expected mask of a sink, k / n_pool (the expected mode's constant)."""
        return self.sinks_per_source / self.n_pool

    def p_gen_of(self, n_backbone: int) -> float:
        """The backbone fraction n_backbone / (n_backbone + n_pool) of the backbone-only scale."""
        return n_backbone / (n_backbone + self.n_pool)

    def _layer_word(self, layer: int) -> int:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < MASK32:
            raise ValueError(f"layer must be an int in [0, 2**32 - 1), got {layer!r}")
        return int(layer) + 1 if self.per_layer else 0

    # ---- numpy level -------------------------------------------------------------
    def shard_of_np(self, ids: np.ndarray) -> np.ndarray:
        """Shard of each id, int64 [B]."""
        return self._shard(_check_ids(ids))

    def sinks_of_np(self, ids: np.ndarray, layer: int = 0, chunk: int = _CHUNK) -> np.ndarray:
        """Global pool rows of each id, int64 [B, k], ascending in each row."""
        return self._rows(_check_ids(ids), self._layer_word(layer), np.int64, chunk)

    def _shard(self, ids: np.ndarray) -> np.ndarray:
        e = self.n_shards
        # The trailing counter word 0 keeps the shard hash the same shape as the sink hash.
        rot = _reduce(hash_words(self.seed, TAG_SHARD, 0, ids // np.uint32(e), 0), e)
        return ((ids % np.uint32(e)).astype(np.int64) + rot) % e

    def _rows(self, ids: np.ndarray, layer_word: int, dtype: type = np.int64, chunk: int = _CHUNK,
              n_cand: int | None = None) -> np.ndarray:
        """Global rows [B, k] of uint32 ids; ``chunk`` and ``n_cand`` change speed, never the result."""
        k, p = self.sinks_per_source, self.shard_size
        n_cand = _candidate_count(k, p) if n_cand is None else max(int(n_cand), k)
        chunk = max(1, int(chunk))
        h_src = _absorb(hash_words(self.seed, TAG_SINK, layer_word), ids)
        offset = (self._shard(ids) * p).astype(dtype)
        out = np.empty((len(ids), k), dtype=dtype)
        for start in range(0, len(ids), chunk):
            h, dst = h_src[start:start + chunk], out[start:start + chunk]
            todo, c = np.arange(len(h)), n_cand
            while len(todo):
                rows, ok = self._draw(h[todo], c)
                if len(rows) == len(dst):
                    dst[...] = rows  # the common case: one pass, slice copy
                else:
                    dst[todo[ok]] = rows
                todo, c = todo[~ok], min(2 * c, ID_LIMIT)  # rare: rows with many repeats
            dst += offset[start:start + chunk, None]
        return out

    def _draw(self, h_src: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
        """First k distinct of c candidates per row; returns (rows of the ok sources, ok mask)."""
        k, p = self.sinks_per_source, self.shard_size
        ctr = np.arange(c, dtype=np.uint32)
        x = h_src[:, None] ^ (ctr * np.uint32(GOLDEN))[None, :]
        mix32(x)
        # Sort keys value<<bits|counter: one plain (SIMD) sort gives value order with the
        # first occurrence of every value first; a stable argsort is ~8x slower here.
        bits = max(1, (c - 1).bit_length())
        if p << bits <= ID_LIMIT:
            # floor(h*p*2^bits / 2^32) >> bits == floor(h*p / 2^32): the Lemire value and
            # its key in one product; the low bits are then overwritten by the counter.
            v = x.astype(np.uint64)
            v *= np.uint64(p << bits)
            v >>= np.uint64(32)
            key = v.astype(np.uint32)
            key &= np.uint32(~((1 << bits) - 1) & MASK32)
            key |= ctr
        else:
            key = (_reduce(x, p).astype(np.uint64) << np.uint64(bits)) | ctr.astype(np.uint64)
        del x
        key.sort(axis=1)
        val = key >> key.dtype.type(bits)
        cnt = key & key.dtype.type((1 << bits) - 1)
        dup = np.zeros(key.shape, dtype=bool)
        np.equal(val[:, 1:], val[:, :-1], out=dup[:, 1:])
        # Counter of the k-th distinct value: T = k-1+m, m = repeats with counter <= T.
        # Repeats are rare (~0.8 per row at the paper's shape), so work on them sparsely:
        # with d_1 <= d_2 <= ... a row's repeat counters, m = min{m : d_(m+1) > k-1+m}.
        idx = np.flatnonzero(dup)  # 10x faster than 2-D nonzero
        rd = (idx // c) * c + cnt.ravel()[idx].astype(np.int64)  # (row, counter) as one int
        rd.sort()
        r, d = rd // c, rd % c
        rank = np.arange(len(r)) - np.searchsorted(r, r, side="left")
        m = np.bincount(r, minlength=len(h_src))
        viol = d > k - 1 + rank
        np.minimum.at(m, r[viol], rank[viol])
        t = k - 1 + m
        ok = t < c
        sel = ~dup
        sel &= cnt <= t[:, None].astype(cnt.dtype)
        if not ok.all():
            val, sel = val[ok], sel[ok]
        return val[sel].reshape(-1, k).astype(np.uint32, copy=False), ok

    def usage_counts(self, n_sources: int, layer: int = 0, chunk: int = 1 << 15,
                     progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Stream ids 0..n_sources-1; return (sources per shard [E], sources per sink [n_pool])."""
        if not 0 <= n_sources <= ID_LIMIT:
            raise ValueError(f"n_sources must be in [0, 2**32], got {n_sources}")
        shard_counts = np.zeros(self.n_shards, dtype=np.int64)
        sink_counts = np.zeros(self.n_pool, dtype=np.int64)
        lw = self._layer_word(layer)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=n_sources, unit="src", unit_scale=True)
        for start in range(0, n_sources, chunk):
            ids = np.arange(start, min(start + chunk, n_sources), dtype=np.uint64).astype(np.uint32)
            shard = self._shard(ids)
            rows = self._rows(ids, lw, np.uint32)  # n_pool < 2**32, uint32 halves the traffic
            shard_counts += np.bincount(shard, minlength=self.n_shards)
            sink_counts += np.bincount(rows.ravel(), minlength=self.n_pool)
            if bar is not None:
                bar.update(len(ids))
        if bar is not None:
            bar.close()
        return shard_counts, sink_counts

    # ---- torch level -------------------------------------------------------------
    @staticmethod
    def _to_numpy(sources: torch.Tensor) -> np.ndarray:
        if not isinstance(sources, torch.Tensor):
            raise ValueError(f"sources must be a torch.Tensor, got {type(sources).__name__}")
        if sources.dtype == torch.bool or sources.is_floating_point() or sources.is_complex():
            raise ValueError(f"sources must have an integer dtype, got {sources.dtype}")
        if sources.dim() != 1:
            raise ValueError(f"sources must be 1-D, got shape {tuple(sources.shape)}")
        return sources.detach().cpu().numpy()

    def shard_of(self, sources: torch.Tensor) -> torch.Tensor:
        """Shard of each source, int64 [B] on the input's device."""
        out = self.shard_of_np(self._to_numpy(sources))
        return torch.from_numpy(out).to(sources.device)

    def sinks_of(self, sources: torch.Tensor, layer: int = 0) -> torch.Tensor:
        """Global pool rows of each source, int64 [B, k], ascending per row, on the input's device."""
        out = self.sinks_of_np(self._to_numpy(sources), layer)
        return torch.from_numpy(out).to(sources.device)

    def dense_mask(self, sources: torch.Tensor, layer: int = 0) -> torch.Tensor:
        """bool [B, n_pool], True on each source's sinks."""
        rows = self.sinks_of(sources, layer)
        mask = torch.zeros(rows.shape[0], self.n_pool, dtype=torch.bool, device=rows.device)
        return mask.scatter_(1, rows, True)


Assignment = Union[SinkAssignment, UpstreamAssignment]


def assignment_from_config(nulls) -> Assignment:
    """The assignment a :class:`nulls_megatron.config.NullsConfig` describes (``nulls.assignment``:
    ``counter``, this module's, or ``upstream``, the authors' hash for imported checkpoints)."""
    if nulls.assignment == "upstream":
        u = nulls.upstream
        return UpstreamAssignment(n_pool=nulls.n_pool, p_mem=u.p_mem, p_gen=u.p_gen, id_offset=u.id_offset)
    return SinkAssignment(
        n_pool=nulls.n_pool,
        sinks_per_source=nulls.sinks_per_source,
        n_shards=nulls.pool_shards,
        seed=nulls.seed,
        per_layer=nulls.per_layer_sinks,
    )


def assignment_from_dict(fields: dict) -> Assignment:
    """The assignment a sink manifest records (``dataclasses.asdict`` of one); upstream ones carry
    ``scheme: upstream``, counter-based ones no scheme (as every checkpoint written before)."""
    if fields.get("scheme") == "upstream":
        return UpstreamAssignment(**fields)
    return SinkAssignment(**fields)

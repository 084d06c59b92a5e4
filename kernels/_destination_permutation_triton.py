"""Triton kernels of ``destination_permutation`` (imported only when Triton runs them)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def block_histogram(dest_ptr, block_hist_ptr, n, D_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """block_hist[b, d] = tokens of block b with destination d."""
    b = tl.program_id(0)
    offs = b * BLOCK + tl.arange(0, BLOCK)
    dest = tl.load(dest_ptr + offs, mask=offs < n, other=-1).to(tl.int64)
    hit = dest[:, None] == tl.arange(0, D_PAD)[None, :]
    tl.store(block_hist_ptr + b * D_PAD + tl.arange(0, D_PAD), tl.sum(hit.to(tl.int64), axis=0))


@triton.jit
def scan_blocks(block_hist_ptr, counts_ptr, offsets_ptr, block_base_ptr, n_blocks, D_PAD: tl.constexpr):
    """One program: counts = column sums; offsets = their exclusive prefix sum (D_PAD + 1 entries);
    block_base[b, d] = offsets[d] + tokens of destination d in blocks before b."""
    cols = tl.arange(0, D_PAD)
    counts = tl.zeros([D_PAD], dtype=tl.int64)
    for b in range(0, n_blocks):
        counts += tl.load(block_hist_ptr + b * D_PAD + cols)
    tl.store(counts_ptr + cols, counts)
    inclusive = tl.cumsum(counts, axis=0)
    exclusive = inclusive - counts
    tl.store(offsets_ptr + cols, exclusive)
    tl.store(offsets_ptr + D_PAD, tl.sum(counts, axis=0))
    running = exclusive
    for b in range(0, n_blocks):
        tl.store(block_base_ptr + b * D_PAD + cols, running)
        running += tl.load(block_hist_ptr + b * D_PAD + cols)


@triton.jit
def scatter_index(dest_ptr, block_base_ptr, perm_ptr, n, D_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """perm[position of token i] = i, the position being its block's base for its destination plus
    the number of earlier tokens of the block with the same destination (stable)."""
    b = tl.program_id(0)
    local = tl.arange(0, BLOCK)
    offs = b * BLOCK + local
    valid = offs < n
    dest = tl.load(dest_ptr + offs, mask=valid, other=-1).to(tl.int64)
    same_before = (dest[:, None] == dest[None, :]) & (local[None, :] < local[:, None])
    rank = tl.sum(same_before.to(tl.int64), axis=1)
    base = tl.load(block_base_ptr + b * D_PAD + dest, mask=valid, other=0)
    tl.store(perm_ptr + base + rank, offs.to(tl.int64), mask=valid)

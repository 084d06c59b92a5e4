"""Triton kernels of ``permute_rows`` (imported only when Triton runs them). Grid: (rows, column blocks)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def gather_rows(src_ptr, perm_ptr, out_ptr, h, BLOCK: tl.constexpr):
    """out[j] = src[perm[j]]."""
    j = tl.program_id(0).to(tl.int64)  # row offsets j * h pass 2**31 on large batches
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    keep = cols < h
    row = tl.load(perm_ptr + j)
    tl.store(out_ptr + j * h + cols, tl.load(src_ptr + row * h + cols, mask=keep), mask=keep)


@triton.jit
def scatter_rows_add(src_ptr, perm_ptr, base_ptr, out_ptr, h, HAS_BASE: tl.constexpr, BLOCK: tl.constexpr):
    """out[perm[j]] = src[j] (+ base[perm[j]]): each output row written once, by its own program."""
    j = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    keep = cols < h
    row = tl.load(perm_ptr + j)
    value = tl.load(src_ptr + j * h + cols, mask=keep)
    if HAS_BASE:
        # In fp32, rounded once to the output's type: what torch's index_add computes for bf16 too.
        value = (value.to(tl.float32) + tl.load(base_ptr + row * h + cols, mask=keep).to(tl.float32))
    tl.store(out_ptr + row * h + cols, value.to(out_ptr.dtype.element_ty), mask=keep)

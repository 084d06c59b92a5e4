"""Group tokens by destination, stably: the permutation of a token dispatch.

Given each token's destination ``dest`` ([N] ints in ``[0, D)``: an expert-parallel rank, a
source group), returns

- ``counts`` [D] int64: tokens per destination (the histogram, the split sizes of an all-to-all);
- ``offsets`` [D+1] int64: their exclusive prefix sum (where each destination's tokens start);
- ``perm`` [N] int64: the tokens in grouped order, stable (``perm[offsets[d]:offsets[d+1]]`` are the
  tokens of destination ``d``, ascending), so ``x[perm]`` groups rows and scattering back through
  ``perm`` restores them.

Deterministic in both implementations: no atomics decide an order. The Triton version runs in three
launches: a histogram per block of tokens, one program that scans the blocks (counts, offsets and
each block's base per destination), and the scatter, where a token's rank within its block among
tokens of the same destination comes from a comparison of the block with itself. It is written for
a small number of destinations (the expert-parallel ranks: ``D`` up to a few hundred).
"""
from __future__ import annotations

import torch

from .backend import use_triton

__all__ = ["destination_permutation", "destination_permutation_reference"]

_BLOCK = 128


def destination_permutation_reference(dest: torch.Tensor, n_dest: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pure-torch reference: a histogram and a stable argsort."""
    counts = torch.bincount(dest.long(), minlength=n_dest)
    if counts.numel() > n_dest:
        raise ValueError(f"destination {counts.numel() - 1} is not below n_dest = {n_dest}")
    offsets = torch.zeros(n_dest + 1, dtype=torch.int64, device=dest.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    perm = torch.argsort(dest.long(), stable=True)
    return counts, offsets, perm


def destination_permutation(dest: torch.Tensor, n_dest: int, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(counts, offsets, perm) of ``dest`` [N] over ``n_dest`` destinations (module docstring)."""
    if dest.dim() != 1 or dest.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"dest must be a 1-D int32/int64 tensor, got {tuple(dest.shape)} {dest.dtype}")
    if n_dest < 1:
        raise ValueError(f"n_dest must be >= 1, got {n_dest}")
    if not use_triton(dest, impl) or dest.numel() == 0:
        return destination_permutation_reference(dest, n_dest)
    return _triton(dest, n_dest)


def _triton(dest: torch.Tensor, n_dest: int):
    import triton

    from ._destination_permutation_triton import block_histogram, scan_blocks, scatter_index

    n = dest.numel()
    n_blocks = triton.cdiv(n, _BLOCK)
    d_pad = triton.next_power_of_2(n_dest)
    block_hist = torch.empty(n_blocks, d_pad, dtype=torch.int64, device=dest.device)
    block_histogram[(n_blocks,)](dest, block_hist, n, D_PAD=d_pad, BLOCK=_BLOCK)
    counts = torch.empty(d_pad, dtype=torch.int64, device=dest.device)
    offsets = torch.empty(d_pad + 1, dtype=torch.int64, device=dest.device)
    block_base = torch.empty(n_blocks, d_pad, dtype=torch.int64, device=dest.device)
    scan_blocks[(1,)](block_hist, counts, offsets, block_base, n_blocks, D_PAD=d_pad)
    perm = torch.empty(n, dtype=torch.int64, device=dest.device)
    scatter_index[(n_blocks,)](dest, block_base, perm, n, D_PAD=d_pad, BLOCK=_BLOCK)
    return counts[:n_dest], offsets[:n_dest + 1], perm

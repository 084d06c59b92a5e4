"""Grouped sink SwiGLU: each token runs through the few sink neurons of its own group.

Tokens are grouped by source; group ``u`` owns ``k`` rows of a sink table whose
rows hold one sink neuron each: ``table[r, 0]`` its gate weight (a row of W1),
``table[r, 1]`` its up weight (a row of W3) and ``table[r, 2]`` its down weight
(a column of W2). For a token ``x`` of group ``u`` with rows ``R_u`` and gates
``g_u`` (1 for a live sink, 0 for a disabled one, any scale otherwise)::

    y = sum_j g_u[j] * silu(W1[R_u[j]] . x) * (W3[R_u[j]] . x) * W2[R_u[j]]

Only ``k`` neurons per token are computed, never the whole table. The
backward is written by hand so that the table gradient is accumulated straight
into the rows that were used (one ``index_add_``): plain autograd over
``index_select`` per group would materialise a full-table gradient per group.

With ``grad_table_into`` (a data-parallel engine's fp32 gradient buffer, Megatron's ``main_grad``)
the rows' gradients are added straight into that buffer: no zero-filled table-sized gradient per
call (~3 ms for a [4096, 3, 256] table on a CPU, cache-cold) and no second table-sized add by the
engine's accumulation hook. The table then receives an uninitialised placeholder gradient (so that
its hooks still fire, e.g. to mark its bucket ready for an overlapped reduce), and
``table.grad_added_to_main_grad`` is set to True: Megatron's convention for "already accumulated,
do not add ``.grad``", which its DDP hook honours (as it does for its own fused linear layers).

``GroupedSinkSwiGLUTorch`` (``_grouped_sink_swiglu_torch.py``) is the pure-torch reference (CPU
tensors, ``impl="torch"``): groups of one length batched into one ``bmm`` per GEMM kind, short groups
padded into shared lengths, and the table gradient added sparsely into an existing ``.grad``;
``_GroupedSinkSwiGLUTriton`` runs the kernels of ``_grouped_sink_swiglu_triton.py`` (CUDA tensors, or
``impl="triton"`` in Triton's interpreter) in one launch per stage for all groups:

- forward and input gradient: one program per tile (up to ``BLOCK_T`` tokens of one group; a tile
  table built on the device from ``counts``, no per-group launch and no host copy) holding the
  group's ``k`` rows;
- table gradient: one program per (group, block of its sinks, block of columns) sums over the
  group's tokens in order into a [U, k, 3, d] fp32 buffer; the groups' rows are then added into the
  table gradient (or ``grad_table_into``) by one program per distinct row and column block, over the
  groups that use the row in ascending order (a stable sort of ``row_ids``; ``index_add_`` with
  repeated rows is not deterministic on CUDA). No atomics anywhere: the same bits every run.

Token rows move through ``permute_rows`` (Triton on CUDA). Nothing is imported from the project
outside ``kernels/``.
"""
from __future__ import annotations

import torch

from ._grouped_sink_swiglu_torch import GroupedSinkSwiGLUTorch
from .backend import use_triton
from .permute_rows import gather, scatter

__all__ = ["grouped_sink_swiglu", "check_groups"]


_BLOCK_D = 64  # columns per table-gradient program
_BLOCK_ROW = 256  # of a table row's 3 d values per program of the cross-group sum


def _block_sizes(k: int) -> tuple[int, int, int, int]:
    """(K_PAD, BLOCK_T, BLOCK_TILE_D, BLOCK_K): the padded sinks a tile holds, tokens per tile and
    columns per step of a tile's loops (fewer for a large ``k``: a tile keeps two [BLOCK_T, K_PAD]
    fp32 accumulators and two [BLOCK_TILE_D, K_PAD] weight blocks in registers), sinks per
    table-gradient program. All >= 16, the smallest ``tl.dot`` operand."""
    import triton

    k_pad = max(16, triton.next_power_of_2(k))
    block_t = 64 if k_pad <= 32 else 32 if k_pad <= 128 else 16
    return k_pad, block_t, 64 if k_pad <= 64 else 32, min(k_pad, 64)


def _tile_table(offsets: list[int], counts: torch.Tensor, block_t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(group offsets [U+1], group of each tile, first token of each tile), on the device from
    ``counts``: only the number of tiles comes from the host's ``offsets``."""
    n_tiles = sum(-(-(hi - lo) // block_t) for lo, hi in zip(offsets[:-1], offsets[1:]))
    device = counts.device
    counts = counts.to(torch.int64)
    ends = torch.cumsum(counts, 0) + offsets[0]
    group_offsets = torch.cat([ends.new_full((1,), offsets[0]), ends])
    per_group = torch.div(counts + block_t - 1, block_t, rounding_mode="floor")
    tile_group = torch.repeat_interleave(torch.arange(counts.numel(), device=device), per_group, output_size=n_tiles)
    first_tile = torch.cumsum(per_group, 0) - per_group
    within = torch.arange(n_tiles, device=device) - first_tile[tile_group]
    tile_start = group_offsets[tile_group] + within * block_t
    return group_offsets, tile_group, tile_start


def _dot_precision(dtype: torch.dtype) -> str | None:
    # fp32 products as the torch reference computes them (no TF32 unless torch is told to allow it).
    return "ieee" if dtype in (torch.float32, torch.float64) else None


class _GroupedSinkSwiGLUTriton(torch.autograd.Function):
    # The reference's contract, in three kinds of launches (module docstring); a, b and their
    # gradients are kept in fp32 between the launches.
    @staticmethod
    def forward(ctx, x, table, perm, offsets, row_ids, gates, base, counts, grad_table_into):  # type: ignore[override]
        from . import _grouped_sink_swiglu_triton as kernels

        if table.dtype != x.dtype:
            raise ValueError(f"x ({x.dtype}) and table ({table.dtype}) must share a dtype")
        ctx.table_shape = table.shape
        ctx.table, ctx.grad_table_into = (table, grad_table_into) if grad_table_into is not None else (None, None)
        k = row_ids.shape[1]
        table, row_ids, gates = table.contiguous(), row_ids.contiguous(), gates.contiguous()
        x_sorted = (x if perm is None else gather(x, perm, "triton")).contiguous()
        n_tokens, d = x_sorted.shape
        if counts is None:  # a blocking host-to-device copy on a GPU: callers that can, pass counts
            counts = torch.tensor([hi - lo for lo, hi in zip(offsets[:-1], offsets[1:])], device=x.device)
        k_pad, block_t, block_d, _ = _block_sizes(k)
        group_offsets, tile_group, tile_start = _tile_table(offsets, counts, block_t)
        y_sorted = torch.empty_like(x_sorted)
        pre = torch.empty(n_tokens, 2, k, dtype=torch.float32, device=x.device)
        # With tokens already grouped, base is added in the kernel; otherwise in the scatter back.
        fold_base = base is not None and perm is None
        if tile_group.numel() and k:
            kernels.forward[(tile_group.numel(),)](
                x_sorted, table, row_ids, gates, group_offsets, tile_group, tile_start,
                base.contiguous() if fold_base else x_sorted, y_sorted, pre, d, k, HAS_BASE=fold_base,
                PRECISION=_dot_precision(x.dtype), K_PAD=k_pad, BLOCK_T=block_t, BLOCK_D=block_d)
        elif fold_base:
            y_sorted.copy_(base)
        else:
            y_sorted.zero_()
        y = y_sorted if perm is None else scatter(y_sorted, perm, base, "triton")
        ctx.save_for_backward(x_sorted, pre, table, row_ids, gates, perm, group_offsets, tile_group, tile_start)
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        from . import _grouped_sink_swiglu_triton as kernels

        x_sorted, pre, table, row_ids, gates, perm, group_offsets, tile_group, tile_start = ctx.saved_tensors
        k = row_ids.shape[1]
        d = x_sorted.shape[1]
        need_x, need_table = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_y = grad_y.contiguous()
        dy_sorted = grad_y if perm is None else gather(grad_y, perm, "triton")
        k_pad, block_t, block_d, block_k = _block_sizes(k)
        precision = _dot_precision(x_sorted.dtype)
        launch = (need_x or need_table) and tile_group.numel() > 0 and k > 0
        dx_sorted = None if not need_x else torch.empty_like(x_sorted) if launch else torch.zeros_like(x_sorted)
        d_ab = torch.empty_like(pre) if need_table else None
        if launch:
            kernels.backward_input[(tile_group.numel(),)](
                dy_sorted, table, row_ids, gates, group_offsets, tile_group, tile_start, pre,
                pre if d_ab is None else d_ab, x_sorted if dx_sorted is None else dx_sorted, d, k,
                WRITE_D_AB=need_table, WRITE_DX=need_x, PRECISION=precision, K_PAD=k_pad, BLOCK_T=block_t,
                BLOCK_D=block_d)
        grad_x = grad_table = None
        if need_x:
            grad_x = dx_sorted if perm is None else scatter(dx_sorted, perm, None, "triton")
        if need_table:
            grad_table = _table_gradient(kernels, ctx, x_sorted, dy_sorted, gates, row_ids, group_offsets, pre, d_ab,
                                         block_k, block_t, precision)
        grad_base = grad_y if ctx.needs_input_grad[6] else None
        return grad_x, grad_table, None, None, None, None, grad_base, None, None


def _table_gradient(kernels, ctx, x_sorted, dy_sorted, gates, row_ids, group_offsets, pre, d_ab, block_k, block_t,
                    precision) -> torch.Tensor:
    """Each group's row gradients into [U, k, 3, d] fp32, then summed per table row over the groups
    that use it, in ascending group order (deterministic where ``index_add_`` on CUDA is not)."""
    import triton

    n_groups, k = row_ids.shape
    d = x_sorted.shape[1]
    width = 3 * d
    into = ctx.grad_table_into
    if into is not None:
        # Megatron's main_grad is a view into a contiguous bucket; any other buffer goes through a copy.
        target = into if into.is_contiguous() else torch.zeros_like(into)
    else:
        target = x_sorted.new_zeros(ctx.table_shape)
    if n_groups and k:
        partial = torch.empty(n_groups, k, 3, d, dtype=torch.float32, device=x_sorted.device)
        kernels.backward_rows[(n_groups, triton.cdiv(k, block_k), triton.cdiv(d, _BLOCK_D))](
            x_sorted, dy_sorted, gates, group_offsets, pre, d_ab, partial, d, k, PRECISION=precision,
            BLOCK_K=block_k, BLOCK_T=block_t, BLOCK_D=_BLOCK_D)
        sorted_rows, order = torch.sort(row_ids.reshape(-1), stable=True)
        segment_end = torch.searchsorted(sorted_rows, sorted_rows, right=True)
        kernels.add_rows[(n_groups * k, triton.cdiv(width, _BLOCK_ROW))](
            partial, order, sorted_rows, segment_end, target, width, ACCUMULATE=into is not None, BLOCK=_BLOCK_ROW)
    if into is None:
        return target
    if target is not into:
        into.add_(target)
    ctx.table.grad_added_to_main_grad = True
    return x_sorted.new_empty(ctx.table_shape)  # never read: the flag above says so


def check_groups(x: torch.Tensor, table: torch.Tensor, offsets: list[int], row_ids: torch.Tensor, gates: torch.Tensor,
                 grad_table_into: torch.Tensor | None) -> None:
    """Clear errors for tokens, table and groups that do not fit together (shared by the kernels that
    take ``grouped_sink_swiglu``'s groups)."""
    if x.dim() != 2 or table.dim() != 3 or table.shape[1] != 3 or table.shape[2] != x.shape[1]:
        raise ValueError(f"expected x [T, d] and table [R, 3, d], got {tuple(x.shape)} and {tuple(table.shape)}")
    if row_ids.shape != gates.shape or row_ids.shape[0] != len(offsets) - 1:
        raise ValueError(
            f"row_ids {tuple(row_ids.shape)} and gates {tuple(gates.shape)} must be [U, k] with U = len(offsets) - 1 = {len(offsets) - 1}"
        )
    if offsets[0] != 0 or offsets[-1] != x.shape[0] or any(lo > hi for lo, hi in zip(offsets[:-1], offsets[1:])):
        raise ValueError(f"offsets must rise from 0 to the number of tokens ({x.shape[0]}), got {offsets[0]} .. {offsets[-1]}")
    if grad_table_into is not None and grad_table_into.shape != table.shape:
        raise ValueError(f"grad_table_into {tuple(grad_table_into.shape)} must have the table's shape {tuple(table.shape)}")


def grouped_sink_swiglu(
    x: torch.Tensor,
    table: torch.Tensor,
    perm: torch.Tensor | None,
    offsets: list[int],
    row_ids: torch.Tensor,
    gates: torch.Tensor,
    base: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    grad_table_into: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Sink output for every token, in the tokens' original order, plus ``base``.

    Args:
        x: [T, d] token activations.
        table: [R, 3, d] sink rows (gate, up, down weight of one neuron each).
        perm: [T] int64 permutation that sorts tokens into contiguous groups, or
            None when they already are.
        offsets: U+1 Python ints; group ``u`` is ``perm[offsets[u]:offsets[u+1]]``.
        row_ids: [U, k] int64 table rows of each group (distinct within a group).
        gates: [U, k] multipliers of each group's sink activations.
        base: optional [T, d] added to the result (e.g. the backbone output): folded
            into the down-projection GEMMs instead of a separate pass.
        counts: optional [U] int64 tokens per group on x's device (the differences of ``offsets``);
            without it they are copied from the host on every call.
        grad_table_into: optional buffer of the table's shape (any float dtype) that the table's
            gradient is added into (module docstring); ``table`` must then be the parameter itself.
        impl: ``auto`` (Triton for CUDA tensors, the reference otherwise), ``triton`` or ``torch``
            (kernels/backend.py).

    Returns [T, d]. Differentiable in ``x``, ``table`` and ``base``.
    """
    check_groups(x, table, offsets, row_ids, gates, grad_table_into)
    if base is not None and base.shape != x.shape:
        raise ValueError(f"base {tuple(base.shape)} must have the shape of x {tuple(x.shape)}")
    if counts is not None and counts.shape != (len(offsets) - 1,):
        raise ValueError(f"counts {tuple(counts.shape)} must be [U] with U = len(offsets) - 1 = {len(offsets) - 1}")
    function = _GroupedSinkSwiGLUTriton if use_triton(x, impl) else GroupedSinkSwiGLUTorch
    return function.apply(x, table, perm, offsets, row_ids, gates.to(x.dtype), base, counts, grad_table_into)

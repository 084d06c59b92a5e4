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

This is the pure-torch reference; it imports nothing from the project.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["grouped_sink_swiglu"]


def _gather_rows(table: torch.Tensor, row_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of every group, as fused gate/up matrices [U, 2k, d] (interleaved
    gate, up per sink) and down matrices [U, k, d]."""
    n_groups, k = row_ids.shape
    rows = table.index_select(0, row_ids.reshape(-1)).view(n_groups, k, 3, -1)
    w13 = rows[:, :, :2].reshape(n_groups, 2 * k, -1)
    w2 = rows[:, :, 2].contiguous()
    return w13, w2


class _GroupedSinkSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, table, perm, offsets, row_ids, gates):  # type: ignore[override]
        w13, w2 = _gather_rows(table, row_ids)
        x_sorted = x if perm is None else x.index_select(0, perm)
        pre = x_sorted.new_empty(x_sorted.shape[0], w13.shape[1])
        y_sorted = torch.empty_like(x_sorted)
        k = row_ids.shape[1]
        for u in range(len(offsets) - 1):
            lo, hi = offsets[u], offsets[u + 1]
            if lo == hi:
                continue
            torch.matmul(x_sorted[lo:hi], w13[u].t(), out=pre[lo:hi])
            ab = pre[lo:hi].view(hi - lo, k, 2)
            h = F.silu(ab[..., 0]) * ab[..., 1] * gates[u]
            torch.matmul(h, w2[u], out=y_sorted[lo:hi])
        y = y_sorted if perm is None else torch.empty_like(y_sorted).index_copy_(0, perm, y_sorted)
        ctx.save_for_backward(x_sorted, pre, w13, w2, perm, row_ids, gates)
        ctx.offsets = offsets
        ctx.table_shape = table.shape
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        x_sorted, pre, w13, w2, perm, row_ids, gates = ctx.saved_tensors
        offsets = ctx.offsets
        n_groups, k = row_ids.shape
        need_x, need_table = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dy_sorted = grad_y if perm is None else grad_y.index_select(0, perm)
        dx_sorted = torch.zeros_like(x_sorted) if need_x else None
        d_w13 = torch.zeros_like(w13) if need_table else None
        d_w2 = torch.zeros_like(w2) if need_table else None
        for u in range(n_groups):
            lo, hi = offsets[u], offsets[u + 1]
            if lo == hi:
                continue
            ab = pre[lo:hi].view(hi - lo, k, 2)
            a, b = ab[..., 0], ab[..., 1]
            sig = torch.sigmoid(a)
            silu_a = a * sig
            dy = dy_sorted[lo:hi]
            dh = torch.matmul(dy, w2[u].t()) * gates[u]
            d_ab = torch.stack((dh * b * sig * (1 + a * (1 - sig)), dh * silu_a), dim=-1).view(hi - lo, 2 * k)
            if need_x:
                torch.matmul(d_ab, w13[u], out=dx_sorted[lo:hi])
            if need_table:
                h = silu_a * b * gates[u]
                torch.matmul(h.t(), dy, out=d_w2[u])
                torch.matmul(d_ab.t(), x_sorted[lo:hi], out=d_w13[u])
        grad_x = None
        if need_x:
            grad_x = dx_sorted if perm is None else torch.empty_like(dx_sorted).index_copy_(0, perm, dx_sorted)
        grad_table = None
        if need_table:
            d_rows = torch.cat((d_w13.view(n_groups, k, 2, -1), d_w2.unsqueeze(2)), dim=2)
            grad_table = d_rows.new_zeros(ctx.table_shape)
            grad_table.index_add_(0, row_ids.reshape(-1), d_rows.view(n_groups * k, 3, -1))
        return grad_x, grad_table, None, None, None, None


def grouped_sink_swiglu(
    x: torch.Tensor,
    table: torch.Tensor,
    perm: torch.Tensor | None,
    offsets: list[int],
    row_ids: torch.Tensor,
    gates: torch.Tensor,
) -> torch.Tensor:
    """Sink output for every token, in the tokens' original order.

    Args:
        x: [T, d] token activations.
        table: [R, 3, d] sink rows (gate, up, down weight of one neuron each).
        perm: [T] int64 permutation that sorts tokens into contiguous groups, or
            None when they already are.
        offsets: U+1 Python ints; group ``u`` is ``perm[offsets[u]:offsets[u+1]]``.
        row_ids: [U, k] int64 table rows of each group (distinct within a group).
        gates: [U, k] multipliers of each group's sink activations.

    Returns [T, d]. Differentiable in ``x`` and ``table``.
    """
    if x.dim() != 2 or table.dim() != 3 or table.shape[1] != 3 or table.shape[2] != x.shape[1]:
        raise ValueError(f"expected x [T, d] and table [R, 3, d], got {tuple(x.shape)} and {tuple(table.shape)}")
    if row_ids.shape != gates.shape or row_ids.shape[0] != len(offsets) - 1:
        raise ValueError(
            f"row_ids {tuple(row_ids.shape)} and gates {tuple(gates.shape)} must be [U, k] with U = len(offsets) - 1 = {len(offsets) - 1}"
        )
    return _GroupedSinkSwiGLU.apply(x, table, perm, offsets, row_ids, gates.to(x.dtype))

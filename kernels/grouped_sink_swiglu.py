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

This is the pure-torch reference (token rows move through ``permute_rows``, Triton on CUDA); it imports
nothing from the project outside ``kernels/``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .permute_rows import gather, scatter

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
    # Matmuls run per group (each group has its own rows); every elementwise step runs
    # once over all tokens, with each token's gates expanded from its group's.
    @staticmethod
    def forward(ctx, x, table, perm, offsets, row_ids, gates, base, counts, grad_table_into):  # type: ignore[override]
        n_groups, k = row_ids.shape
        w13, w2 = _gather_rows(table, row_ids)
        x_sorted = x if perm is None else gather(x, perm)
        n_tokens = x_sorted.shape[0]
        if counts is None:  # a blocking host-to-device copy on a GPU: callers that can, pass counts
            counts = torch.tensor([hi - lo for lo, hi in zip(offsets[:-1], offsets[1:])], device=x.device)
        token_gates = gates.repeat_interleave(counts, dim=0, output_size=n_tokens)
        pre = x_sorted.new_empty(n_tokens, 2 * k)
        for u in range(n_groups):
            lo, hi = offsets[u], offsets[u + 1]
            torch.matmul(x_sorted[lo:hi], w13[u].t(), out=pre[lo:hi])
        ab = pre.view(n_tokens, k, 2)
        h = F.silu(ab[..., 0]).mul_(ab[..., 1]).mul_(token_gates)
        y_sorted = torch.empty_like(x_sorted)
        # With tokens already grouped, the GEMM adds ``base`` for free (beta = 1).
        fold_base = base is not None and perm is None
        for u in range(n_groups):
            lo, hi = offsets[u], offsets[u + 1]
            if fold_base:
                torch.addmm(base[lo:hi], h[lo:hi], w2[u], out=y_sorted[lo:hi])
            else:
                torch.matmul(h[lo:hi], w2[u], out=y_sorted[lo:hi])
        y = y_sorted if perm is None else scatter(y_sorted, perm, base)
        ctx.save_for_backward(x_sorted, pre, token_gates, w13, w2, perm, row_ids)
        ctx.offsets = offsets
        ctx.table_shape = table.shape
        ctx.table, ctx.grad_table_into = (table, grad_table_into) if grad_table_into is not None else (None, None)
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        x_sorted, pre, token_gates, w13, w2, perm, row_ids = ctx.saved_tensors
        offsets = ctx.offsets
        n_groups, k = row_ids.shape
        n_tokens = x_sorted.shape[0]
        need_x, need_table = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dy_sorted = grad_y if perm is None else gather(grad_y, perm)
        dh = x_sorted.new_empty(n_tokens, k)
        for u in range(n_groups):
            lo, hi = offsets[u], offsets[u + 1]
            torch.matmul(dy_sorted[lo:hi], w2[u].t(), out=dh[lo:hi])
        dh.mul_(token_gates)
        ab = pre.view(n_tokens, k, 2)
        a, b = ab[..., 0], ab[..., 1]
        sig = torch.sigmoid(a)
        silu_a = a * sig
        d_ab = x_sorted.new_empty(n_tokens, k, 2)
        # d silu(a) / da = sig * (1 + a * (1 - sig))
        torch.mul(dh * b, sig * (1 + a * (1 - sig)), out=d_ab[..., 0])
        torch.mul(dh, silu_a, out=d_ab[..., 1])
        d_ab = d_ab.view(n_tokens, 2 * k)
        grad_x = grad_table = None
        if need_x:
            dx_sorted = torch.empty_like(x_sorted)
            for u in range(n_groups):
                lo, hi = offsets[u], offsets[u + 1]
                torch.matmul(d_ab[lo:hi], w13[u], out=dx_sorted[lo:hi])
            grad_x = dx_sorted if perm is None else scatter(dx_sorted, perm)
        if need_table:
            h = silu_a.mul_(b).mul_(token_gates)
            d_rows = x_sorted.new_empty(n_groups, k, 3, x_sorted.shape[1])
            for u in range(n_groups):
                lo, hi = offsets[u], offsets[u + 1]
                d_rows[u, :, :2] = (d_ab[lo:hi].t() @ x_sorted[lo:hi]).view(k, 2, -1)
                torch.matmul(h[lo:hi].t(), dy_sorted[lo:hi], out=d_rows[u, :, 2])
            into = ctx.grad_table_into
            if into is not None:
                into.index_add_(0, row_ids.reshape(-1), d_rows.view(n_groups * k, 3, -1).to(into.dtype))
                ctx.table.grad_added_to_main_grad = True
                grad_table = d_rows.new_empty(ctx.table_shape)  # never read: the flag above says so
            else:
                grad_table = d_rows.new_zeros(ctx.table_shape)
                grad_table.index_add_(0, row_ids.reshape(-1), d_rows.view(n_groups * k, 3, -1))
        grad_base = grad_y if ctx.needs_input_grad[6] else None
        return grad_x, grad_table, None, None, None, None, grad_base, None, None


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

    Returns [T, d]. Differentiable in ``x``, ``table`` and ``base``.
    """
    if x.dim() != 2 or table.dim() != 3 or table.shape[1] != 3 or table.shape[2] != x.shape[1]:
        raise ValueError(f"expected x [T, d] and table [R, 3, d], got {tuple(x.shape)} and {tuple(table.shape)}")
    if row_ids.shape != gates.shape or row_ids.shape[0] != len(offsets) - 1:
        raise ValueError(
            f"row_ids {tuple(row_ids.shape)} and gates {tuple(gates.shape)} must be [U, k] with U = len(offsets) - 1 = {len(offsets) - 1}"
        )
    if base is not None and base.shape != x.shape:
        raise ValueError(f"base {tuple(base.shape)} must have the shape of x {tuple(x.shape)}")
    if counts is not None and counts.shape != (len(offsets) - 1,):
        raise ValueError(f"counts {tuple(counts.shape)} must be [U] with U = len(offsets) - 1 = {len(offsets) - 1}")
    if grad_table_into is not None and grad_table_into.shape != table.shape:
        raise ValueError(f"grad_table_into {tuple(grad_table_into.shape)} must have the table's shape {tuple(table.shape)}")
    return _GroupedSinkSwiGLU.apply(x, table, perm, offsets, row_ids, gates.to(x.dtype), base, counts, grad_table_into)

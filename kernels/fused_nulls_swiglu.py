"""The whole NULLs SwiGLU on the CPU: the backbone and each group's sinks as one SwiGLU per group.

For a token of group ``u`` the NULLs MLP is a SwiGLU of width ``n_backbone + k``: the backbone
neurons (``fc1`` [2 n_backbone, d], gate rows over up rows; ``fc2`` [d, n_backbone]) and the group's
``k`` sink rows of the table (``grouped_sink_swiglu``'s contract). Computing the two apart costs twice
the GEMM calls, narrower GEMMs (MKL runs a [4096, 256] x [256, 250] GEMM at ~80 GFLOP/s and a
[256, 300] one at ~115 on 2 cores) and an add of the two outputs. When groups are long (METHOD.md
section 4 measured the crossover near 256 tokens per source), one GEMM per group over the
concatenated weights is faster: the backbone's rows are copied next to every group's sink rows
(``U x 3 (n_backbone + k) x d`` values), groups of one length run as one ``bmm`` on the slot layout
of ``_grouped_sink_swiglu_torch``, and the backbone's weight gradients are the sums of the groups'.
Groups shorter than ``FUSE_FROM`` (and all groups, when the long ones hold less than half the tokens)
are computed apart: the backbone once over their tokens, their sinks by the reference's functions.

The table gradient takes the reference's three paths (``grad_table_into``, sparse into an existing
``.grad``, dense); ``fc1`` and ``fc2`` get dense gradients. Pure torch: the CUDA path keeps the
backbone in cuBLAS and the sinks in the Triton kernels. Nothing is imported from outside ``kernels/``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._grouped_sink_swiglu_torch import (SlotLayout, gather_rows, sinks_backward, sinks_forward, slot_gates,
                                         swiglu_backward, table_gradient)
from .grouped_sink_swiglu import check_groups

__all__ = ["fused_nulls_swiglu", "FUSE_FROM"]

# Tokens from which a source's backbone and sinks run as one GEMM per kind on a 2-core CPU
# (benchmarks/nulls_mlp.py, d=256, k=25: at 256+ tokens per source 0.9-1.07x the time of a dense SwiGLU
# of the live width, against 1.1-1.25x apart; at 64, 1.5-1.8x against 1.3-1.45x).
FUSE_FROM = 128


def _fuse_from(offsets: list[int]) -> int | None:
    """``FUSE_FROM`` when sources that long hold at least half the tokens, else None (nothing fused):
    with both kinds the short sources' backbone costs a gather and a scatter of their tokens each way,
    which outweighed the fused GEMMs at 64 sources of 3-538 tokens (1.62-1.72x against 1.54-1.56x the
    dense time, 42% of the tokens in sources of >= 128) and did not at 16 of 34-1386 (86%)."""
    long_tokens = sum(hi - lo for lo, hi in zip(offsets[:-1], offsets[1:]) if hi - lo >= FUSE_FROM)
    return FUSE_FROM if 2 * long_tokens >= offsets[-1] else None


class _FusedNullsSwiGLU(torch.autograd.Function):
    # Long groups (fused buckets): columns of the pre-activations are gates (the backbone's, then the
    # group's sinks'), then ups (same order); of the activations backbone, then sinks. Short groups
    # (split buckets): the sinks as in grouped_sink_swiglu, and the backbone over their tokens at once.
    @staticmethod
    def forward(ctx, x, fc1, fc2, table, perm, offsets, row_ids, gates, grad_table_into):  # type: ignore[override]
        nb, k, d = fc2.shape[1], row_ids.shape[1], x.shape[1]
        width = nb + k
        layout = SlotLayout.build(offsets, perm, k, d, x.device, fuse_from=_fuse_from(offsets), fused_width=width)
        (long, long_groups), (short, short_groups) = layout.kind(True), layout.kind(False)
        rows, gates = row_ids.index_select(0, layout.order), gates.index_select(0, layout.order)
        lin13_l, lin2_l, sink13_l, sink2_l = gather_rows(table, rows.index_select(0, long_groups))
        lin13_s, lin2_s, w13_s, w2_s = gather_rows(table, rows.index_select(0, short_groups))
        n_long = sink2_l.shape[0]
        w13_l = x.new_empty(n_long, 2, width, d)
        w2_l = x.new_empty(n_long, width, d)
        gates_l = None
        if long:
            w13_l[:, :, :nb] = fc1.view(2, nb, d)
            w13_l[:, :, nb:] = sink13_l.view(n_long, 2, k, d)
            w2_l[:, :nb] = fc2.t()
            w2_l[:, nb:] = sink2_l
            # A long group's neurons are the backbone's (gate 1) and its sinks: the sinks' functions serve.
            gates_l = slot_gates(torch.cat([gates.new_ones(n_long, nb), gates.index_select(0, long_groups)], dim=1), long)
        w13_l = w13_l.view(n_long, 2 * width, d)
        gates_s = slot_gates(gates.index_select(0, short_groups), short)
        x_slots = layout.to_slots(x)
        y_slots = x_slots.new_empty(layout.n_slots, d)
        saved_l = sinks_forward(long, x_slots, w13_l, w2_l, gates_l, y_slots) if long else (None, None, None)

        # The short groups' backbone runs over their tokens in token order (no padding), once.
        short_tokens = x_bb = pre_bb = s_bb = h_bb = None
        fold = False
        saved_s = (None, None, None)
        if short:
            short_tokens = _tokens_of(short_groups, layout, offsets, perm) if long else None
            x_bb = x if short_tokens is None else x.index_select(0, short_tokens)
            pre_bb = x_bb @ fc1.t()
            s_bb = F.silu(pre_bb[:, :nb])
            h_bb = s_bb * pre_bb[:, nb:]
            y_bb = h_bb @ fc2.t()
            fold = not long and layout.direct  # then the sinks' down GEMMs add the backbone (baddbmm)
            saved_s = sinks_forward(short, x_slots, w13_s, w2_s, gates_s, y_slots, y_bb if fold else None)
        y = layout.from_slots(y_slots)
        if short and not fold:
            if short_tokens is None:
                y.add_(y_bb)
            else:
                y.index_add_(0, short_tokens, y_bb)
        ctx.save_for_backward(fc1, fc2, x_slots, *saved_l, w13_l, w2_l, *saved_s, w13_s, w2_s, x_bb, pre_bb, s_bb, h_bb,
                              torch.cat([lin13_l.reshape(-1), lin2_l.reshape(-1), lin13_s.reshape(-1), lin2_s.reshape(-1)]))
        ctx.layout, ctx.kinds, ctx.gates, ctx.short_tokens, ctx.nb = layout, (long, short), (gates_l, gates_s), short_tokens, nb
        ctx.table_shape, ctx.table, ctx.grad_table_into = table.shape, table, grad_table_into
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        (fc1, fc2, x_slots, pre_l, s_l, h_l, w13_l, w2_l, pre_s, s_s, h_s, w13_s, w2_s, x_bb, pre_bb, s_bb, h_bb,
         flat_rows) = ctx.saved_tensors
        layout, (long, short), (gates_l, gates_s), short_tokens, nb = ctx.layout, ctx.kinds, ctx.gates, ctx.short_tokens, ctx.nb
        n_long, width, d = w2_l.shape
        need_x, need_fc1, need_fc2, need_table = ctx.needs_input_grad[:4]
        dy_slots = layout.to_slots(grad_y)
        dx_slots = torch.empty_like(x_slots) if need_x else None

        # Each long group's whole weight gradient (a bmm per bucket at full width, as fast per FLOP as
        # one GEMM); the backbone's part is their sum over groups.
        d_rows_l = None
        if long:
            d_rows_l = sinks_backward(long, x_slots, dy_slots, (pre_l, s_l, h_l), w13_l, w2_l, gates_l, dx_slots,
                                      need_fc1 or need_fc2 or need_table)
        if d_rows_l is None:
            d_rows_l = w2_l.new_zeros(3 * n_long * width, d)
        d13_l = d_rows_l[:2 * n_long * width].view(n_long, 2, width, d)
        d2_l = d_rows_l[2 * n_long * width:].view(n_long, width, d)
        d_rows_s = None
        if short:
            d_rows_s = sinks_backward(short, x_slots, dy_slots, (pre_s, s_s, h_s), w13_s, w2_s, gates_s, dx_slots,
                                      need_table)
        grad_x = None if dx_slots is None else layout.from_slots(dx_slots)

        grad_fc1 = d13_l[:, :, :nb].sum(0).reshape(2 * nb, d)
        grad_fc2 = d2_l[:, :nb].sum(0).t()
        if short:
            dy_bb = grad_y if short_tokens is None else grad_y.index_select(0, short_tokens)
            d_ab_bb = swiglu_backward(dy_bb @ fc2, pre_bb, s_bb)
            if need_x:
                dx_bb = d_ab_bb @ fc1
                grad_x = grad_x.add_(dx_bb) if short_tokens is None else grad_x.index_add_(0, short_tokens, dx_bb)
            grad_fc1 = torch.addmm(grad_fc1, d_ab_bb.t(), x_bb)
            grad_fc2 = torch.addmm(grad_fc2, dy_bb.t(), h_bb)
        grad_table = None
        if need_table:
            # in flat_rows' order: the long groups' gate and up rows, their down rows, then the short groups'
            parts = ([d13_l[:, :, nb:].reshape(-1, d), d2_l[:, nb:].reshape(-1, d)] if long else []) + \
                ([d_rows_s] if short else [])
            d_rows = parts[0] if len(parts) == 1 else torch.cat(parts) if parts else w2_l.new_empty(0, d)
            grad_table = table_gradient(ctx, flat_rows, d_rows)
        return (grad_x, grad_fc1 if need_fc1 else None, grad_fc2.contiguous() if need_fc2 else None, grad_table,
                None, None, None, None, None)


def _tokens_of(positions: torch.Tensor, layout: SlotLayout, offsets: list[int], perm: torch.Tensor | None) -> torch.Tensor:
    """The token rows of the groups at ``positions`` of the layout's order."""
    groups = layout.order.index_select(0, positions).tolist()
    lengths = torch.tensor([offsets[u + 1] - offsets[u] for u in groups], dtype=torch.long, device=positions.device)
    starts = torch.tensor([offsets[u] for u in groups], dtype=torch.long, device=positions.device)
    total = int(lengths.sum())
    shift = torch.repeat_interleave(starts - (torch.cumsum(lengths, 0) - lengths), lengths, output_size=total)
    sorted_positions = shift + torch.arange(total, device=positions.device)
    return sorted_positions if perm is None else perm.index_select(0, sorted_positions)


def fused_nulls_swiglu(
    x: torch.Tensor,
    fc1: torch.Tensor,
    fc2: torch.Tensor,
    table: torch.Tensor,
    perm: torch.Tensor | None,
    offsets: list[int],
    row_ids: torch.Tensor,
    gates: torch.Tensor,
    grad_table_into: torch.Tensor | None = None,
) -> torch.Tensor:
    """``silu(fc1_gate x) * fc1_up x`` through ``fc2``, plus ``grouped_sink_swiglu(x, table, ...)``, in
    the tokens' order: the NULLs MLP of a batch in train or route mode (the backbone at scale 1).

    Args:
        x: [T, d]; fc1: [2 n_backbone, d] (gate rows, then up rows); fc2: [d, n_backbone].
        table, perm, offsets, row_ids, gates, grad_table_into: as ``grouped_sink_swiglu``.

    Returns [T, d]. Differentiable in ``x``, ``fc1``, ``fc2`` and ``table``.
    """
    if fc1.dim() != 2 or fc2.dim() != 2 or fc1.shape != (2 * fc2.shape[1], x.shape[-1]) or fc2.shape[0] != x.shape[-1]:
        raise ValueError(f"expected x [T, d], fc1 [2 n, d] and fc2 [d, n], got {tuple(x.shape)}, "
                         f"{tuple(fc1.shape)} and {tuple(fc2.shape)}")
    check_groups(x, table, offsets, row_ids, gates, grad_table_into)
    return _FusedNullsSwiGLU.apply(x, fc1, fc2, table, perm, offsets, row_ids, gates.to(x.dtype), grad_table_into)

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

The table gradient takes the reference's three paths (``grad_table_into``, sparse into an existing
``.grad``, dense); ``fc1`` and ``fc2`` get dense gradients. Pure torch: the CUDA path keeps the
backbone in cuBLAS and the sinks in the Triton kernels. Nothing is imported from outside ``kernels/``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._grouped_sink_swiglu_torch import _Layout, _table_gradient
from .grouped_sink_swiglu import check_groups

__all__ = ["fused_nulls_swiglu", "fusing_is_faster", "FUSE_FROM"]

# Tokens per source from which one GEMM per group beats the separate backbone and sinks on a 2-core
# CPU (benchmarks/nulls_mlp.py, d=256, k=25): at 256+ tokens per source 0.9-1.07x the time of a dense
# SwiGLU of the live width against 1.1-1.25x apart; at 64, 1.5-1.8x against 1.3-1.45x.
FUSE_FROM = 128


def fusing_is_faster(offsets: list[int]) -> bool:
    """Whether groups at ``offsets`` are long enough, on average, for ``fused_nulls_swiglu``."""
    groups = sum(1 for lo, hi in zip(offsets[:-1], offsets[1:]) if hi > lo)
    return groups > 0 and offsets[-1] >= FUSE_FROM * groups


class _FusedNullsSwiGLU(torch.autograd.Function):
    # Columns of the pre-activations: gates (the backbone's, then the group's sinks'), then ups (same
    # order); of the activations: backbone, then sinks. Elementwise steps run once over all columns.
    @staticmethod
    def forward(ctx, x, fc1, fc2, table, perm, offsets, row_ids, gates, grad_table_into):  # type: ignore[override]
        nb, k, d = fc2.shape[1], row_ids.shape[1], x.shape[1]
        width = nb + k
        layout = _Layout.build(offsets, perm, width, d, x.device)
        n_groups = layout.order.numel()
        rows = row_ids.index_select(0, layout.order)
        lin13, lin2 = torch.cat([rows * 3, rows * 3 + 1], dim=1), rows * 3 + 2
        flat_table = table.reshape(-1, d)
        w13 = x.new_empty(n_groups, 2, width, d)
        w13[:, :, :nb] = fc1.view(2, nb, d)
        w13[:, :, nb:] = flat_table.index_select(0, lin13.reshape(-1)).view(n_groups, 2, k, d)
        w13 = w13.view(n_groups, 2 * width, d)
        w2 = x.new_empty(n_groups, width, d)
        w2[:, :nb] = fc2.t()
        w2[:, nb:] = flat_table.index_select(0, lin2.reshape(-1)).view(n_groups, k, d)
        gates = gates.index_select(0, layout.order)
        slot_gates = None if bool(gates.eq(1).all()) else gates.index_select(0, layout.slot_group)
        x_slots = layout.to_slots(x)
        pre = x_slots.new_empty(layout.n_slots, 2 * width)
        for bucket in layout.buckets:
            torch.bmm(bucket.slots(x_slots), bucket.groups(w13).transpose(1, 2), out=bucket.slots(pre))
        s = F.silu(pre[:, :width])
        h = s * pre[:, width:]
        if slot_gates is not None:
            h[:, nb:].mul_(slot_gates)
        y_slots = x_slots.new_empty(layout.n_slots, d)
        for bucket in layout.buckets:
            torch.bmm(bucket.slots(h), bucket.groups(w2), out=bucket.slots(y_slots))
        ctx.save_for_backward(x_slots, pre, s, h, w13, w2, lin13, lin2)
        ctx.layout, ctx.slot_gates, ctx.nb = layout, slot_gates, nb
        ctx.table_shape, ctx.table, ctx.grad_table_into = table.shape, table, grad_table_into
        return layout.from_slots(y_slots)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        x_slots, pre, s, h, w13, w2, lin13, lin2 = ctx.saved_tensors
        layout, slot_gates, nb = ctx.layout, ctx.slot_gates, ctx.nb
        n_groups, width, d = w2.shape
        dy_slots = layout.to_slots(grad_y)
        dh = dy_slots.new_empty(layout.n_slots, width)
        for bucket in layout.buckets:
            torch.bmm(bucket.slots(dy_slots), bucket.groups(w2).transpose(1, 2), out=bucket.slots(dh))
        if slot_gates is not None:
            dh[:, nb:].mul_(slot_gates)
        a, b = pre[:, :width], pre[:, width:]
        d_ab = dh.new_empty(layout.n_slots, 2 * width)
        torch.ops.aten.silu_backward.grad_input(dh * b, a, grad_input=d_ab[:, :width])
        torch.mul(dh, s, out=d_ab[:, width:])
        grad_x = grad_fc1 = grad_fc2 = grad_table = None
        if ctx.needs_input_grad[0]:
            dx_slots = torch.empty_like(x_slots)
            for bucket in layout.buckets:
                torch.bmm(bucket.slots(d_ab), bucket.groups(w13), out=bucket.slots(dx_slots))
            grad_x = layout.from_slots(dx_slots)
        if any(ctx.needs_input_grad[1:4]):
            # Each group's whole weight gradient (a bmm per bucket at full width, as fast per FLOP as one
            # GEMM); the backbone's is their sum over groups.
            d13, d2 = w13.new_empty(n_groups, 2, width, d), w2.new_empty(n_groups, width, d)
            for bucket in layout.buckets:
                torch.bmm(bucket.slots(d_ab).transpose(1, 2), bucket.slots(x_slots),
                          out=bucket.groups(d13).view(bucket.count, 2 * width, d))
                torch.bmm(bucket.slots(h).transpose(1, 2), bucket.slots(dy_slots), out=bucket.groups(d2))
            if ctx.needs_input_grad[1]:
                grad_fc1 = d13[:, :, :nb].sum(0).view(2 * nb, d)
            if ctx.needs_input_grad[2]:
                grad_fc2 = d2[:, :nb].sum(0).t().contiguous()
            if ctx.needs_input_grad[3]:
                # the rows lin13 (each group's gate rows, then up rows), then lin2, as the reference
                d_rows = torch.cat([d13[:, :, nb:].reshape(-1, d), d2[:, nb:].reshape(-1, d)])
                grad_table = _table_gradient(ctx, torch.cat([lin13.reshape(-1), lin2.reshape(-1)]), d_rows)
        return grad_x, grad_fc1, grad_fc2, grad_table, None, None, None, None, None


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

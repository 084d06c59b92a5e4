"""The pure-torch reference of ``grouped_sink_swiglu`` (CPU tensors, ``impl="torch"``).

Every group has its own ``k`` rows, so the work is six small GEMMs per group (two forward, four
backward). Called one group at a time they cost more in call overhead than in arithmetic once groups
are short: 64 groups of 64 tokens take 2.7 ms per GEMM kind as a loop of ``mm`` and 1.0 ms as one
``bmm`` (d=256, k=25, 2 cores), the time of one GEMM of the same FLOPs. So groups of one length run
as one ``bmm``, on a **slot layout**:

- every group gets a run of slots, as long as the group or, where padding it costs fewer FLOPs than
  a bucket's calls, as long as the next longer group (``slot_lengths``, by a cost model measured on
  a 2-core CPU);
- groups of one slot length sit side by side, a *bucket*, and each bucket is one ``bmm`` per GEMM
  kind on views; the elementwise steps run once over all slots. ``fused_nulls_swiglu`` marks the
  buckets of long groups as fused (backbone and sinks in one GEMM) and uses the functions here
  (``sinks_forward``, ``sinks_backward``) for both kinds;
- padding slots hold zeros going in (x) and coming back (the output gradient), so they add nothing
  to any gradient.

When the tokens arrive grouped (no ``perm``) and runs of equal-length groups already make few
buckets, the slots are the tokens themselves: no copy, and ``base`` is added by the down GEMM
(``baddbmm``). Otherwise one gather puts the tokens into slots (where ``perm`` needed a gather
anyway) and one gather by the inverse brings the output back. Which layout a call takes changes
speed, never the result beyond fp32 rounding.

The table gradient: each group's rows' gradients, added into the table's gradient. Three ways:

- ``grad_table_into`` (Megatron's fp32 ``main_grad``): one ``index_add_`` into the buffer
  (kernels/grouped_sink_swiglu.py);
- the table is a leaf whose ``.grad`` already holds a dense gradient (gradient accumulation over
  micro-batches): a sparse COO gradient of the used rows, which autograd adds into ``.grad`` in
  place, no table-sized tensor per call; ``.grad`` stays dense;
- otherwise a dense zero-filled gradient with the rows added (autograd then keeps it as ``.grad``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["GroupedSinkSwiGLUTorch", "SlotLayout", "slot_lengths", "gather_rows", "slot_gates", "sinks_forward",
           "sinks_backward", "swiglu_backward", "table_gradient"]

# Costs of the layout choice in FLOP-equivalents, measured on a 2-core CPU (MKL, ~100 GFLOP/s on these
# shapes): one bucket's calls (six bmm and their views, ~80 us), one element of the four row gathers a
# slot layout adds (x and the output gradient in, the output and the input gradient out, ~0.8 ns).
_BUCKET_COST = 8e6
_GATHERED_ELEMENT_COST = 76.0


def _slot_cost(k: int, d: int) -> int:
    """FLOPs of one slot (token or padding) in the six GEMMs."""
    return 18 * max(k, 1) * max(d, 1)


def slot_lengths(sizes: list[int], k: int, d: int) -> dict[int, int]:
    """The slot length of each group length: groups are padded up to the next longer length present
    while padding them costs fewer FLOPs than the calls of a bucket of their own (at d=256, k=25:
    up to ~70 slots in all per merge; at the paper's d=960, k=100: ~5)."""
    counts: dict[int, int] = {}
    for n in sizes:
        counts[n] = counts.get(n, 0) + 1
    distinct = sorted(counts)
    merge_slots = _BUCKET_COST / _slot_cost(k, d)
    target: dict[int, int] = {}
    carried: list[int] = []
    waiting = 0
    for i, length in enumerate(distinct):
        carried.append(length)
        waiting += counts[length]
        if i + 1 < len(distinct) and waiting * (distinct[i + 1] - length) <= merge_slots:
            continue  # cheaper padded into the next length's bucket
        target.update((n, length) for n in carried)
        carried, waiting = [], 0
    return target


@dataclass(frozen=True)
class Bucket:
    """Groups ``[first_group, first_group + count)`` of the slot order, ``length`` slots each, from
    slot ``first_slot`` on. ``fused`` buckets run the backbone with the sinks (fused_nulls_swiglu.py);
    ``own_slot`` and ``own_group`` place the bucket among the buckets of its kind, in tensors that only
    that kind has (pre-activations, weights)."""

    first_slot: int
    first_group: int
    count: int
    length: int
    fused: bool = False
    own_slot: int = 0
    own_group: int = 0

    @property
    def n_slots(self) -> int:
        return self.count * self.length

    def slots(self, t: torch.Tensor) -> torch.Tensor:
        """This bucket's [count, length, H] view of per-slot rows ``t`` [S, H]."""
        return t[self.first_slot:self.first_slot + self.n_slots].view(self.count, self.length, -1)

    def own_slots(self, t: torch.Tensor) -> torch.Tensor:
        """The same of rows ``t`` kept for this bucket's kind only."""
        return t[self.own_slot:self.own_slot + self.n_slots].view(self.count, self.length, -1)

    def own_groups(self, t: torch.Tensor) -> torch.Tensor:
        """This bucket's slice of per-group tensors ``t`` of its kind (in slot order)."""
        return t[self.own_group:self.own_group + self.count]


@dataclass
class SlotLayout:
    """Where each group's tokens sit for the batched GEMMs: ``order`` holds the non-empty groups in
    slot order, ``slot_group`` the position in ``order`` of each slot's group. ``slot_token`` (token
    row of each slot, pads 0), ``token_slot`` (slot of each token) and ``pad_slots`` are None when
    the slots are the tokens themselves (``direct``)."""

    order: torch.Tensor
    buckets: list[Bucket]
    slot_group: torch.Tensor
    slot_token: torch.Tensor | None = None
    token_slot: torch.Tensor | None = None
    pad_slots: torch.Tensor | None = None

    @property
    def direct(self) -> bool:
        return self.slot_token is None

    @property
    def n_slots(self) -> int:
        return self.slot_group.numel()

    @classmethod
    def build(cls, offsets: list[int], perm: torch.Tensor | None, k: int, d: int, device: torch.device,
              fuse_from: int | None = None, fused_width: int = 0) -> "SlotLayout":
        """Groups of ``fuse_from`` tokens or more (when given) go into fused buckets, whose slots cost
        the GEMMs of width ``fused_width``; the others cost the sinks' (``k``)."""
        sizes = [hi - lo for lo, hi in zip(offsets[:-1], offsets[1:])]
        groups = [u for u, n in enumerate(sizes) if n]
        fused = lambda n: fuse_from is not None and n >= fuse_from  # noqa: E731
        width = lambda n: fused_width if fused(n) else k  # noqa: E731
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
        target = slot_lengths([sizes[u] for u in groups if not fused(sizes[u])], k, d)
        target.update(slot_lengths([sizes[u] for u in groups if fused(sizes[u])], fused_width, d))
        padded = [target[sizes[u]] for u in groups]
        runs = _runs([sizes[u] for u in groups])
        if perm is None:
            n_buckets = len(set(padded))
            pad_cost = sum((p - sizes[u]) * _slot_cost(width(sizes[u]), d) for u, p in zip(groups, padded))
            slots_extra = _GATHERED_ELEMENT_COST * offsets[-1] * d + pad_cost - (len(runs) - n_buckets) * _BUCKET_COST
            if slots_extra >= 0:  # the tokens in place are their own slots
                buckets = cls._buckets([(offsets[groups[first]], first, count, length) for first, count, length in runs],
                                       fused)
                slot_group = torch.repeat_interleave(torch.arange(len(groups), device=device),
                                                     as_tensor([sizes[u] for u in groups]), output_size=offsets[-1])
                return cls(as_tensor(groups), buckets, slot_group)
        by_length = sorted(range(len(groups)), key=lambda i: (-padded[i], i))
        order = [groups[i] for i in by_length]
        lengths = [padded[i] for i in by_length]
        placed, n_slots = [], 0
        for first, count, length in _runs(lengths):
            placed.append((n_slots, first, count, length))
            n_slots += count * length
        lengths_t = as_tensor(lengths)
        slot_group = torch.repeat_interleave(torch.arange(len(order), device=device), lengths_t, output_size=n_slots)
        within = torch.arange(n_slots, device=device) - (torch.cumsum(lengths_t, 0) - lengths_t)[slot_group]
        real = within < as_tensor([sizes[u] for u in order])[slot_group]
        position = (as_tensor([offsets[u] for u in order])[slot_group] + within).masked_fill_(~real, 0)
        slot_token = position if perm is None else perm.index_select(0, position)
        real_slots = real.nonzero().squeeze(1)
        token_slot = torch.empty(offsets[-1], dtype=torch.long, device=device)
        token_slot.index_copy_(0, slot_token.index_select(0, real_slots), real_slots)
        return cls(as_tensor(order), cls._buckets(placed, fused), slot_group, slot_token, token_slot,
                   (~real).nonzero().squeeze(1))

    @staticmethod
    def _buckets(placed: list[tuple[int, int, int, int]], fused) -> list[Bucket]:
        own = {True: [0, 0], False: [0, 0]}  # per kind: slots and groups so far
        buckets = []
        for first_slot, first_group, count, length in placed:
            kind = fused(length)
            buckets.append(Bucket(first_slot, first_group, count, length, kind, *own[kind]))
            own[kind][0] += count * length
            own[kind][1] += count
        return buckets

    def kind(self, fused: bool) -> tuple[list[Bucket], torch.Tensor]:
        """The buckets of one kind, and the positions in ``order`` of their groups."""
        buckets = [b for b in self.buckets if b.fused == fused]
        positions = [b.first_group + i for b in buckets for i in range(b.count)]
        return buckets, torch.tensor(positions, dtype=torch.long, device=self.order.device)

    def to_slots(self, rows: torch.Tensor) -> torch.Tensor:
        """Token rows [T, H] into slots [S, H], padding slots zero."""
        if self.direct:
            return rows.contiguous()
        slots = rows.index_select(0, self.slot_token)
        return slots.index_fill_(0, self.pad_slots, 0) if self.pad_slots.numel() else slots

    def from_slots(self, slots: torch.Tensor) -> torch.Tensor:
        """Slots [S, H] back into token rows [T, H] (a view of ``slots`` when direct)."""
        return slots if self.direct else slots.index_select(0, self.token_slot)


def _runs(lengths: list[int]) -> list[tuple[int, int, int]]:
    """(first index, count, length) of each run of equal consecutive lengths."""
    runs: list[tuple[int, int, int]] = []
    for i, length in enumerate(lengths):
        if runs and runs[-1][2] == length:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, length)
        else:
            runs.append((i, 1, length))
    return runs


def gather_rows(table: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For groups' pool rows [U, k]: their rows in the table seen as [3 R, d] (gate, up, down of pool
    row r at 3r, 3r + 1, 3r + 2), as each group's gate rows then up rows [U, 2k] and down rows [U, k],
    and the weights gathered straight into GEMM operands: [U, 2k, d] and [U, k, d]."""
    n_groups, k = rows.shape
    d = table.shape[-1]
    lin13, lin2 = torch.cat([rows * 3, rows * 3 + 1], dim=1), rows * 3 + 2
    flat_table = table.reshape(-1, d)
    w13 = flat_table.index_select(0, lin13.reshape(-1)).view(n_groups, 2 * k, d)
    w2 = flat_table.index_select(0, lin2.reshape(-1)).view(n_groups, k, d)
    return lin13, lin2, w13, w2


def slot_gates(gates: torch.Tensor, buckets: list[Bucket]) -> torch.Tensor | None:
    """Each slot's gates [S_kind, k] from its group's (``gates`` [U_kind, k] in the kind's group order);
    None when every gate is 1."""
    if bool(gates.eq(1).all()):
        return None
    lengths = torch.tensor([b.length for b in buckets for _ in range(b.count)], dtype=torch.long, device=gates.device)
    return gates.repeat_interleave(lengths, dim=0, output_size=sum(b.n_slots for b in buckets))


def swiglu_backward(dh: torch.Tensor, pre: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Gradient [N, 2w] of the pre-activations ``pre`` = [gates | ups] of ``h = silu(gates) * ups``
    from that of ``h`` [N, w]; ``s`` is ``silu(gates)``."""
    width = dh.shape[1]
    d_ab = dh.new_empty(dh.shape[0], 2 * width)
    torch.ops.aten.silu_backward.grad_input(dh * pre[:, width:], pre[:, :width], grad_input=d_ab[:, :width])
    torch.mul(dh, s, out=d_ab[:, width:])
    return d_ab


def sinks_forward(buckets: list[Bucket], x_slots: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  gates: torch.Tensor | None, y_slots: torch.Tensor, base: torch.Tensor | None = None):
    """The sinks of ``buckets`` into their slots of ``y_slots`` (plus ``base`` there, by the down GEMM);
    returns what their backward needs (pre-activations, silu of the gates, activations)."""
    k = w2.shape[1]
    pre = x_slots.new_empty(sum(b.n_slots for b in buckets), 2 * k)
    for bucket in buckets:
        torch.bmm(bucket.slots(x_slots), bucket.own_groups(w13).transpose(1, 2), out=bucket.own_slots(pre))
    s = F.silu(pre[:, :k])
    h = s * pre[:, k:]
    if gates is not None:
        h.mul_(gates)
    for bucket in buckets:
        if base is not None:
            torch.baddbmm(bucket.slots(base), bucket.own_slots(h), bucket.own_groups(w2), out=bucket.slots(y_slots))
        else:
            torch.bmm(bucket.own_slots(h), bucket.own_groups(w2), out=bucket.slots(y_slots))
    return pre, s, h


def sinks_backward(buckets: list[Bucket], x_slots: torch.Tensor, dy_slots: torch.Tensor, saved, w13: torch.Tensor,
                   w2: torch.Tensor, gates: torch.Tensor | None, dx_slots: torch.Tensor | None,
                   need_rows: bool) -> torch.Tensor | None:
    """The input gradient of ``buckets`` into their slots of ``dx_slots`` (when given); returns the
    groups' row gradients [3 U k, d] in ``gather_rows``' order (each group's gate rows, then up rows,
    then every group's down rows) when ``need_rows``."""
    pre, s, h = saved
    n_groups, k, d = w2.shape
    dh = dy_slots.new_empty(pre.shape[0], k)
    for bucket in buckets:
        torch.bmm(bucket.slots(dy_slots), bucket.own_groups(w2).transpose(1, 2), out=bucket.own_slots(dh))
    if gates is not None:
        dh.mul_(gates)
    d_ab = swiglu_backward(dh, pre, s)
    if dx_slots is not None:
        for bucket in buckets:
            torch.bmm(bucket.own_slots(d_ab), bucket.own_groups(w13), out=bucket.slots(dx_slots))
    if not need_rows:
        return None
    # One buffer for both, so that its rows are the table rows lin13, then lin2, without a copy.
    d_rows = w13.new_empty(3 * n_groups * k, d)
    d13 = d_rows[:2 * n_groups * k].view(n_groups, 2 * k, d)
    d2 = d_rows[2 * n_groups * k:].view(n_groups, k, d)
    for bucket in buckets:
        torch.bmm(bucket.own_slots(d_ab).transpose(1, 2), bucket.slots(x_slots), out=bucket.own_groups(d13))
        torch.bmm(bucket.own_slots(h).transpose(1, 2), bucket.slots(dy_slots), out=bucket.own_groups(d2))
    return d_rows


class GroupedSinkSwiGLUTorch(torch.autograd.Function):
    """The contract of ``kernels.grouped_sink_swiglu.grouped_sink_swiglu`` (module docstring)."""

    @staticmethod
    def forward(ctx, x, table, perm, offsets, row_ids, gates, base, counts, grad_table_into):  # type: ignore[override]
        k, d = row_ids.shape[1], x.shape[1]
        layout = SlotLayout.build(offsets, perm, k, d, x.device)
        lin13, lin2, w13, w2 = gather_rows(table, row_ids.index_select(0, layout.order))
        gates = slot_gates(gates.index_select(0, layout.order), layout.buckets)
        x_slots = layout.to_slots(x)
        y_slots = x_slots.new_empty(layout.n_slots, d)
        fold_base = base is not None and layout.direct  # the down GEMM adds it (baddbmm, beta = 1)
        saved = sinks_forward(layout.buckets, x_slots, w13, w2, gates, y_slots, base.contiguous() if fold_base else None)
        y = layout.from_slots(y_slots)
        if base is not None and not fold_base:
            y.add_(base)
        ctx.save_for_backward(x_slots, *saved, w13, w2, lin13, lin2)
        ctx.layout, ctx.gates = layout, gates
        ctx.table_shape, ctx.table, ctx.grad_table_into = table.shape, table, grad_table_into
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        x_slots, pre, s, h, w13, w2, lin13, lin2 = ctx.saved_tensors
        layout = ctx.layout
        dy_slots = layout.to_slots(grad_y)
        dx_slots = torch.empty_like(x_slots) if ctx.needs_input_grad[0] else None
        d_rows = sinks_backward(layout.buckets, x_slots, dy_slots, (pre, s, h), w13, w2, ctx.gates, dx_slots,
                                ctx.needs_input_grad[1])
        grad_x = None if dx_slots is None else layout.from_slots(dx_slots)
        grad_table = None
        if d_rows is not None:
            grad_table = table_gradient(ctx, torch.cat([lin13.reshape(-1), lin2.reshape(-1)]), d_rows)
        grad_base = grad_y if ctx.needs_input_grad[6] else None
        return grad_x, grad_table, None, None, None, None, grad_base, None, None


def table_gradient(ctx, flat_rows: torch.Tensor, d_rows: torch.Tensor) -> torch.Tensor:
    """The rows' gradients ``d_rows`` [N, d] added at rows ``flat_rows`` of the table seen as [3 R, d]
    (module docstring: into ``grad_table_into``, as a sparse gradient, or into a dense one)."""
    into, table, shape = ctx.grad_table_into, ctx.table, ctx.table_shape
    if into is not None:
        target = into if into.is_contiguous() else torch.zeros_like(into)
        target.view(-1, shape[-1]).index_add_(0, flat_rows, d_rows.to(into.dtype))
        if target is not into:
            into.add_(target)
        table.grad_added_to_main_grad = True
        return d_rows.new_empty(shape)  # never read: the flag above says so
    grad = table.grad if table.is_leaf else None
    if (grad is not None and grad.layout == torch.strided and grad.dtype == d_rows.dtype
            and grad.device == d_rows.device and not torch.is_grad_enabled()):
        indices = torch.stack([torch.div(flat_rows, 3, rounding_mode="floor"), flat_rows % 3])
        return torch.sparse_coo_tensor(indices, d_rows, shape, check_invariants=False)
    return d_rows.new_zeros(shape).view(-1, shape[-1]).index_add_(0, flat_rows, d_rows).view(shape)

"""Triton kernels of ``grouped_sink_swiglu`` (imported only when Triton runs them).

Layouts: ``x``, ``dy``, ``base``, ``y``, ``dx`` [T, d] in grouped token order; ``table`` [R, 3, d];
``row_ids``, ``gates`` [U, k]; ``offsets`` [U+1] (device); the tile table ``tile_group``,
``tile_start`` [n_tiles] (a tile: up to BLOCK_T tokens of one group); ``pre`` and ``d_ab`` [T, 2, k]
fp32 (a, b and their gradients per token and sink); ``partial`` [U, k, 3, d] fp32 (each group's
row gradients).

Every reduction runs in a fixed order inside one program (no atomics): the same bits every run.
Sinks are padded to K_PAD (a power of two >= 16) and tokens and columns are blocks of >= 16, the
smallest shapes ``tl.dot`` takes; the padding is masked to zero on load.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _group_rows(row_ids_ptr, gates_ptr, u, k, K_PAD: tl.constexpr):
    """Offsets (in elements) of the group's table rows, its gates (fp32) and the mask of real sinks."""
    sinks = tl.arange(0, K_PAD)
    live = sinks < k
    rows = tl.load(row_ids_ptr + u * k + sinks, mask=live, other=0).to(tl.int64)
    gates = tl.load(gates_ptr + u * k + sinks, mask=live, other=0.0).to(tl.float32)
    return rows, gates, live


@triton.jit
def _tile(tile_group_ptr, tile_start_ptr, offsets_ptr, BLOCK_T: tl.constexpr):
    """This program's tile: its group, its tokens (up to BLOCK_T from the tile's start) and which of
    them belong to the group."""
    tile = tl.program_id(0)
    u = tl.load(tile_group_ptr + tile).to(tl.int64)
    t0 = tl.load(tile_start_ptr + tile).to(tl.int64)
    hi = tl.load(offsets_ptr + u + 1).to(tl.int64)
    tokens = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
    return u, tokens, tokens < hi


@triton.jit
def forward(x_ptr, table_ptr, row_ids_ptr, gates_ptr, offsets_ptr, tile_group_ptr, tile_start_ptr, base_ptr,
            y_ptr, pre_ptr, d, k, HAS_BASE: tl.constexpr, PRECISION: tl.constexpr, K_PAD: tl.constexpr,
            BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """One tile of tokens: a = x W1^T, b = x W3^T over d blocks; h = g silu(a) b; y = h W2 (+ base).
    Saves a and b (fp32) for the backward."""
    u, tokens, in_group = _tile(tile_group_ptr, tile_start_ptr, offsets_ptr, BLOCK_T)
    rows, gates, live = _group_rows(row_ids_ptr, gates_ptr, u, k, K_PAD)
    dtype = x_ptr.dtype.element_ty

    a = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
    b = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
    for c0 in range(0, d, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        in_d = cols < d
        x = tl.load(x_ptr + tokens[:, None] * d + cols[None, :], mask=in_group[:, None] & in_d[None, :], other=0.0)
        w_mask = in_d[:, None] & live[None, :]
        # Rows loaded transposed ([BLOCK_D, K_PAD]) so that both products are plain x @ w.
        w1 = tl.load(table_ptr + (rows[None, :] * 3 + 0) * d + cols[:, None], mask=w_mask, other=0.0)
        w3 = tl.load(table_ptr + (rows[None, :] * 3 + 1) * d + cols[:, None], mask=w_mask, other=0.0)
        a = tl.dot(x, w1, a, input_precision=PRECISION)
        b = tl.dot(x, w3, b, input_precision=PRECISION)
    pre_mask = in_group[:, None] & live[None, :]
    pre_at = pre_ptr + tokens[:, None] * (2 * k) + tl.arange(0, K_PAD)[None, :]
    tl.store(pre_at, a, mask=pre_mask)
    tl.store(pre_at + k, b, mask=pre_mask)
    h = (a * tl.sigmoid(a) * b * gates[None, :]).to(dtype)

    for c0 in range(0, d, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        in_d = cols < d
        w2 = tl.load(table_ptr + (rows[:, None] * 3 + 2) * d + cols[None, :], mask=live[:, None] & in_d[None, :],
                     other=0.0)
        y = tl.dot(h, w2, input_precision=PRECISION)
        out_mask = in_group[:, None] & in_d[None, :]
        at = tokens[:, None] * d + cols[None, :]
        if HAS_BASE:
            y += tl.load(base_ptr + at, mask=out_mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + at, y.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def backward_input(dy_ptr, table_ptr, row_ids_ptr, gates_ptr, offsets_ptr, tile_group_ptr, tile_start_ptr, pre_ptr,
                   d_ab_ptr, dx_ptr, d, k, WRITE_D_AB: tl.constexpr, WRITE_DX: tl.constexpr,
                   PRECISION: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """One tile of tokens: dh = g (dy W2^T); da = dh b silu'(a), db = dh silu(a) (saved, fp32, for
    the table gradient); dx = da W1 + db W3."""
    u, tokens, in_group = _tile(tile_group_ptr, tile_start_ptr, offsets_ptr, BLOCK_T)
    rows, gates, live = _group_rows(row_ids_ptr, gates_ptr, u, k, K_PAD)
    dtype = dy_ptr.dtype.element_ty

    dh = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
    for c0 in range(0, d, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        in_d = cols < d
        dy = tl.load(dy_ptr + tokens[:, None] * d + cols[None, :], mask=in_group[:, None] & in_d[None, :], other=0.0)
        w2 = tl.load(table_ptr + (rows[None, :] * 3 + 2) * d + cols[:, None], mask=in_d[:, None] & live[None, :],
                     other=0.0)
        dh = tl.dot(dy, w2, dh, input_precision=PRECISION)
    dh = dh * gates[None, :]
    pre_mask = in_group[:, None] & live[None, :]
    pre_at = tokens[:, None] * (2 * k) + tl.arange(0, K_PAD)[None, :]
    a = tl.load(pre_ptr + pre_at, mask=pre_mask, other=0.0)
    b = tl.load(pre_ptr + pre_at + k, mask=pre_mask, other=0.0)
    sig = tl.sigmoid(a)
    da = dh * b * (sig * (1.0 + a * (1.0 - sig)))
    db = dh * (a * sig)
    if WRITE_D_AB:
        tl.store(d_ab_ptr + pre_at, da, mask=pre_mask)
        tl.store(d_ab_ptr + pre_at + k, db, mask=pre_mask)

    if WRITE_DX:
        da_in = da.to(dtype)
        db_in = db.to(dtype)
        for c0 in range(0, d, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            in_d = cols < d
            w_mask = live[:, None] & in_d[None, :]
            w1 = tl.load(table_ptr + (rows[:, None] * 3 + 0) * d + cols[None, :], mask=w_mask, other=0.0)
            w3 = tl.load(table_ptr + (rows[:, None] * 3 + 1) * d + cols[None, :], mask=w_mask, other=0.0)
            dx = tl.dot(da_in, w1, input_precision=PRECISION)
            dx = tl.dot(db_in, w3, dx, input_precision=PRECISION)
            tl.store(dx_ptr + tokens[:, None] * d + cols[None, :], dx.to(dx_ptr.dtype.element_ty),
                     mask=in_group[:, None] & in_d[None, :])


@triton.jit
def backward_rows(x_ptr, dy_ptr, gates_ptr, offsets_ptr, pre_ptr, d_ab_ptr, partial_ptr, d, k,
                  PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (group, sink block, column block): the group's row gradients over its tokens, in token
    order: dW1 = da^T x, dW3 = db^T x, dW2 = h^T dy, into ``partial[u]`` (fp32)."""
    u = tl.program_id(0).to(tl.int64)
    sinks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    live = sinks < k
    in_d = cols < d
    lo = tl.load(offsets_ptr + u).to(tl.int64)
    hi = tl.load(offsets_ptr + u + 1).to(tl.int64)
    gates = tl.load(gates_ptr + u * k + sinks, mask=live, other=0.0).to(tl.float32)
    dtype = x_ptr.dtype.element_ty

    dw1 = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    dw3 = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    dw2 = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for t0 in range(lo, hi, BLOCK_T):
        tokens = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        in_group = tokens < hi
        row_mask = in_group[:, None] & in_d[None, :]
        x = tl.load(x_ptr + tokens[:, None] * d + cols[None, :], mask=row_mask, other=0.0)
        dy = tl.load(dy_ptr + tokens[:, None] * d + cols[None, :], mask=row_mask, other=0.0)
        # Per-token sink values loaded transposed ([BLOCK_K, BLOCK_T]): the products are plain v @ x.
        sink_mask = live[:, None] & in_group[None, :]
        at = tokens[None, :] * (2 * k) + sinks[:, None]
        da = tl.load(d_ab_ptr + at, mask=sink_mask, other=0.0)
        db = tl.load(d_ab_ptr + at + k, mask=sink_mask, other=0.0)
        a = tl.load(pre_ptr + at, mask=sink_mask, other=0.0)
        b = tl.load(pre_ptr + at + k, mask=sink_mask, other=0.0)
        h = a * tl.sigmoid(a) * b * gates[:, None]
        dw1 = tl.dot(da.to(dtype), x, dw1, input_precision=PRECISION)
        dw3 = tl.dot(db.to(dtype), x, dw3, input_precision=PRECISION)
        dw2 = tl.dot(h.to(dtype), dy, dw2, input_precision=PRECISION)
    out_mask = live[:, None] & in_d[None, :]
    at = ((u * k + sinks[:, None]) * 3) * d + cols[None, :]
    tl.store(partial_ptr + at, dw1, mask=out_mask)
    tl.store(partial_ptr + at + d, dw3, mask=out_mask)
    tl.store(partial_ptr + at + 2 * d, dw2, mask=out_mask)


@triton.jit
def add_rows(partial_ptr, order_ptr, sorted_rows_ptr, segment_end_ptr, out_ptr, width,
             ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (entry of the sorted (group, sink) list, column block of a row's 3 d values). The first
    entry of each run of equal table rows sums the run's partials in sorted order (groups
    ascending: a stable sort) and writes the row (added to ``out``'s value with ACCUMULATE);
    the other entries do nothing. Every row written once, in a fixed order: deterministic."""
    i = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    keep = cols < width
    row = tl.load(sorted_rows_ptr + i)
    previous = tl.load(sorted_rows_ptr + tl.maximum(i - 1, 0))
    first = (i == 0) | (previous != row)
    end = tl.where(first, tl.load(segment_end_ptr + i), i)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(i, end):
        entry = tl.load(order_ptr + j)
        acc += tl.load(partial_ptr + entry * width + cols, mask=keep, other=0.0)
    write = cols < tl.where(first, width, 0)
    if ACCUMULATE:
        acc += tl.load(out_ptr + row * width + cols, mask=write, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * width + cols, acc.to(out_ptr.dtype.element_ty), mask=write)

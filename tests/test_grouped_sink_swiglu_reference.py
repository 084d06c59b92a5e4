"""The pure-torch grouped sink SwiGLU (kernels/_grouped_sink_swiglu_torch.py): its slot layouts and
its three ways of handing back the table gradient, against a per-group loop of plain autograd."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels._grouped_sink_swiglu_torch import SlotLayout, slot_lengths
from kernels.grouped_sink_swiglu import grouped_sink_swiglu


def per_group_autograd(x, table, perm, offsets, row_ids, gates, base):
    """The definition, one group at a time, differentiated by autograd."""
    x_sorted = x if perm is None else x[perm]
    parts = []
    for u in range(len(offsets) - 1):
        rows = table[row_ids[u]]
        xu = x_sorted[offsets[u]:offsets[u + 1]]
        h = F.silu(xu @ rows[:, 0].t()) * (xu @ rows[:, 1].t()) * gates[u]
        parts.append(h @ rows[:, 2])
    y_sorted = torch.cat(parts) if parts else x_sorted * 0
    y = y_sorted if perm is None else torch.zeros_like(y_sorted).index_add(0, perm, y_sorted)
    return y if base is None else y + base


def layout_case(sizes: list[int], with_perm: bool, k: int, d: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    offsets = [0] + torch.tensor(sizes).cumsum(0).tolist()
    n_tokens, n_rows = offsets[-1], 3 * k + 5
    row_ids = torch.stack([torch.randperm(n_rows, generator=gen)[:k] for _ in sizes])
    gates = (torch.rand(len(sizes), k, generator=gen, dtype=torch.float64) + 0.5) * (torch.rand(len(sizes), k, generator=gen) > 0.2)
    return dict(
        x=torch.randn(n_tokens, d, generator=gen, dtype=torch.float64),
        table=torch.randn(n_rows, 3, d, generator=gen, dtype=torch.float64) * 0.3,
        perm=torch.randperm(n_tokens, generator=gen) if with_perm else None,
        offsets=offsets, row_ids=row_ids, gates=gates,
        base=torch.randn(n_tokens, d, generator=gen, dtype=torch.float64),
        grad_y=torch.randn(n_tokens, d, generator=gen, dtype=torch.float64))


def run(fn, case):
    x = case["x"].clone().requires_grad_(True)
    table = torch.nn.Parameter(case["table"].clone())
    base = case["base"].clone().requires_grad_(True)
    y = fn(x, table, case["perm"], case["offsets"], case["row_ids"], case["gates"], base)
    y.backward(case["grad_y"])
    return y.detach(), x.grad, table.grad, base.grad


CASES = {
    # (group sizes, perm, k, d): which layout the cost model picks for them is asserted below
    "equal groups, in place": ([40] * 6, False, 4, 24),
    "a few long uneven groups, in place": ([1300, 600, 2000, 900], False, 25, 256),
    "many short uneven groups, padded slots": ([1, 3, 17, 2, 9, 30, 5, 5, 12, 64, 7, 1, 40, 22], False, 4, 24),
    "a permutation, empty groups, long and short": ([0, 5, 200, 0, 3, 3, 129, 1], True, 6, 16),
    "one group": ([57], False, 3, 8),
    "short groups where calls cost more than padding: padded slots": ([300, 150, 700, 131], False, 4, 24),
}


@pytest.mark.parametrize("name", CASES)
def test_every_layout_matches_the_per_group_definition(name):
    sizes, with_perm, k, d = CASES[name]
    case = layout_case(sizes, with_perm, k, d)
    layout = SlotLayout.build(case["offsets"], case["perm"], k, d, torch.device("cpu"))
    expect_direct = not with_perm and "padded slots" not in name
    assert layout.direct == expect_direct
    got = run(grouped_sink_swiglu, case)
    want = run(per_group_autograd, case)
    for what, a, b in zip(("output", "grad x", "grad table", "grad base"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}, {what}: {m}")


def test_slot_layout_places_every_token_once_and_pads_with_zeros():
    sizes = [1, 3, 17, 2, 9, 30, 0, 5, 5, 12, 64, 7, 1, 40, 22]
    offsets = [0] + torch.tensor(sizes).cumsum(0).tolist()
    perm = torch.randperm(offsets[-1], generator=torch.Generator().manual_seed(1))
    layout = SlotLayout.build(offsets, perm, 4, 24, torch.device("cpu"))
    assert not layout.direct and len(layout.buckets) < len([n for n in sizes if n])
    n_tokens = offsets[-1]
    assert layout.n_slots == n_tokens + layout.pad_slots.numel()
    # token t sits in slot token_slot[t], and that slot names t back
    assert torch.equal(layout.slot_token[layout.token_slot], torch.arange(n_tokens))
    rows = torch.arange(n_tokens, dtype=torch.float64).unsqueeze(1) + 1
    slots = layout.to_slots(rows)
    assert torch.count_nonzero(slots[layout.pad_slots]) == 0
    assert torch.equal(layout.from_slots(slots), rows)
    # each bucket holds groups of one slot length, each group's tokens in order from its first slot
    for bucket in layout.buckets:
        for i in range(bucket.count):
            u = int(layout.order[bucket.first_group + i])
            first = bucket.first_slot + i * bucket.length
            want = perm[offsets[u]:offsets[u + 1]]
            assert torch.equal(layout.slot_token[first:first + len(want)], want)


def test_slot_lengths_pad_short_groups_only_while_cheaper_than_a_bucket():
    sizes = [3, 5, 5, 9, 60, 61, 300]
    small = slot_lengths(sizes, k=2, d=8)  # calls dominate: pad everything up to the longest
    assert set(small.values()) == {300}
    paper = slot_lengths(sizes, k=100, d=960)  # arithmetic dominates: a few slots per merge at most
    assert paper == {3: 5, 5: 5, 9: 9, 60: 61, 61: 61, 300: 300}
    demo = slot_lengths(sizes, k=25, d=256)
    assert all(length >= n for n, length in demo.items()) and demo[300] == 300 and demo[3] > 3


def test_table_gradient_paths_give_one_answer():
    """A dense gradient when .grad is empty (kept as .grad), a sparse one added into an existing dense
    .grad (which stays dense, hooks fire), a dense one under create_graph and for a non-leaf table."""
    case = layout_case([30, 2, 7, 0, 90], True, 5, 12, seed=3)
    _, _, expected, _ = run(per_group_autograd, case)
    args = (case["perm"], case["offsets"], case["row_ids"], case["gates"])

    table = torch.nn.Parameter(case["table"].clone())
    fired = []
    table.register_post_accumulate_grad_hook(lambda p: fired.append(p.grad.layout))
    grouped_sink_swiglu(case["x"], table, *args).backward(case["grad_y"])
    torch.testing.assert_close(table.grad, expected)
    grouped_sink_swiglu(case["x"], table, *args).backward(case["grad_y"])  # accumulates: sparse into dense
    assert table.grad.layout == torch.strided and fired == [torch.strided, torch.strided]
    torch.testing.assert_close(table.grad, 2 * expected)

    table.grad = torch.zeros_like(table)
    y = grouped_sink_swiglu(case["x"], table, *args)
    (grad,) = torch.autograd.grad(y, table, case["grad_y"], create_graph=True)
    assert grad.layout == torch.strided
    torch.testing.assert_close(grad, expected)

    leaf = torch.nn.Parameter(case["table"].clone())
    leaf.grad = torch.ones_like(leaf)
    grouped_sink_swiglu(case["x"], leaf * 1.0, *args).backward(case["grad_y"])
    torch.testing.assert_close(leaf.grad, 1 + expected)


def test_grad_table_into_a_non_contiguous_buffer():
    case = layout_case([12, 40, 3], False, 4, 10, seed=5)
    _, _, expected, _ = run(per_group_autograd, case)
    table = torch.nn.Parameter(case["table"].clone())
    storage = torch.zeros(table.shape[0], 2, *table.shape[1:], dtype=torch.float64)
    into = storage[:, 1]  # [R, 3, d], not contiguous
    assert not into.is_contiguous()
    grouped_sink_swiglu(case["x"], table, None, case["offsets"], case["row_ids"], case["gates"],
                        grad_table_into=into).backward(case["grad_y"])
    torch.testing.assert_close(into, expected)
    assert torch.count_nonzero(storage[:, 0]) == 0

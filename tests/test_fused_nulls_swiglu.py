"""The fused NULLs SwiGLU (kernels/fused_nulls_swiglu.py): the backbone and each source's sinks as one
SwiGLU per source, against the backbone and the per-group definition computed apart by autograd; and
the layers that take it (SinkTable.forward_with_backbone) where sources are long."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.fused_nulls_swiglu import FUSE_FROM, fused_nulls_swiglu
from nulls_megatron.sinks.assignment import SinkAssignment
from nulls_megatron.sinks.mlp import NullsMLP
from nulls_megatron.sinks.routing import SinkRouting
from nulls_megatron.sinks.table import normal_init
from tests.test_grouped_sink_swiglu_reference import layout_case, per_group_autograd
from tests.test_nulls_mlp import assert_matches_reference


def backbone_then_sinks(x, fc1, fc2, table, perm, offsets, row_ids, gates):
    gate, up = (x @ fc1.t()).chunk(2, dim=-1)
    return per_group_autograd(x, table, perm, offsets, row_ids, gates, (F.silu(gate) * up) @ fc2.t())


def run(fn, case, fc1, fc2):
    x = case["x"].clone().requires_grad_(True)
    leaves = [torch.nn.Parameter(t.clone()) for t in (fc1, fc2, case["table"])]
    y = fn(x, *leaves, case["perm"], case["offsets"], case["row_ids"], case["gates"])
    y.backward(case["grad_y"])
    return y.detach(), x.grad, *(p.grad for p in leaves)


@pytest.mark.parametrize("sizes, with_perm", [
    ([300], False),  # one source
    ([140, 140, 140], False),  # equal sources: one bmm per GEMM kind, tokens in place
    ([0, 200, 3, 0, 150, 400], True),  # a permutation, empty and short groups: padded slots
    ([200, 5, 7, 400, 30], False),  # long and short sources in place
    ([5, 9, 30, 30], False),  # short sources only, in place: the backbone added by the sinks' GEMMs
    ([5, 9, 0, 30, 1], True),  # short sources only, permuted
    ([130, 100, 100, 100], False),  # a long source with less than half the tokens: nothing fused
])
def test_fused_equals_backbone_plus_sinks(sizes, with_perm):
    k, d, n_backbone = 5, 12, 7
    case = layout_case(sizes, with_perm, k, d, seed=11)
    gen = torch.Generator().manual_seed(12)
    fc1 = torch.randn(2 * n_backbone, d, generator=gen, dtype=torch.float64) * 0.3
    fc2 = torch.randn(d, n_backbone, generator=gen, dtype=torch.float64) * 0.3
    got = run(fused_nulls_swiglu, case, fc1, fc2)
    want = run(backbone_then_sinks, case, fc1, fc2)
    for what, a, b in zip(("output", "grad x", "grad fc1", "grad fc2", "grad table"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"{what}: {m}")


def test_long_sources_are_fused_when_they_hold_half_the_tokens():
    from kernels.fused_nulls_swiglu import _fuse_from

    assert _fuse_from([0, 4096]) == FUSE_FROM
    assert _fuse_from([0, 200, 205, 212, 612, 642]) == FUSE_FROM  # 600 of 642 tokens in long sources
    assert _fuse_from([0, 130, 230, 330, 430]) is None  # 130 of 430
    assert _fuse_from([0, 64, 128, 192]) is None


def test_fused_rejects_inconsistent_shapes():
    x, table = torch.randn(4, 8), torch.randn(10, 3, 8)
    rows, gates = torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2)
    with pytest.raises(ValueError, match=r"fc1 \[2 n, d\] and fc2 \[d, n\]"):
        fused_nulls_swiglu(x, torch.randn(6, 8), torch.randn(8, 4), table, None, [0, 4], rows, gates)
    with pytest.raises(ValueError, match="offsets must rise"):
        fused_nulls_swiglu(x, torch.randn(8, 8), torch.randn(8, 4), table, None, [0, 3], rows, gates)


def test_the_layer_takes_it_on_the_cpu_and_still_equals_the_masked_dense_reference():
    """NullsMLP goes through fused_nulls_swiglu in train and route modes on the CPU (long sources
    fused, short ones apart), and the result is the method's masked-dense MLP, also with a forgotten
    source's sinks off; the expected mode keeps the separate path."""
    torch.manual_seed(3)
    mlp = NullsMLP(32, 8, SinkAssignment(96, 6, n_shards=2, seed=7), init_method=normal_init(0.3))
    gen = torch.Generator().manual_seed(4)
    ids = torch.tensor([11, 500, 77, 9, 4])
    # three sources of ~FUSE_FROM tokens or more and two short ones, shuffled
    sources = ids[torch.multinomial(torch.tensor([1.0, 1.0, 1.0, 0.03, 0.03]), 4 * FUSE_FROM, replacement=True,
                                    generator=gen)]
    sources[:5] = ids
    x = torch.randn(sources.numel(), 32, generator=gen)
    sizes = torch.unique(sources, return_counts=True)[1]
    assert (sizes >= FUSE_FROM).any() and (sizes < FUSE_FROM).any()
    flat = x.reshape(-1, 32)
    assert mlp.sinks.forward_with_backbone(flat, SinkRouting.train(sources), mlp.backbone_fc1, mlp.backbone_fc2) is not None
    assert mlp.sinks.forward_with_backbone(flat, SinkRouting.expected(), mlp.backbone_fc1, mlp.backbone_fc2) is None

    assert_matches_reference(mlp, x, SinkRouting.train(sources), sources)
    with torch.no_grad():
        mlp.sinks.disabled[mlp.sinks.assignment.sinks_of(torch.tensor([500]))[0]] = True
    assert_matches_reference(mlp, x, SinkRouting.train(sources), sources)
    chosen = torch.full_like(sources, 77)
    assert_matches_reference(mlp, x, SinkRouting.route(chosen), chosen)


def test_fused_with_no_tokens_or_no_sinks():
    fc1 = torch.randn(6, 8, requires_grad=True)
    fc2 = torch.randn(8, 3, requires_grad=True)
    table = torch.randn(10, 3, 8, requires_grad=True)
    x = torch.zeros(0, 8, requires_grad=True)
    y = fused_nulls_swiglu(x, fc1, fc2, table, None, [0, 0], torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2))
    y.sum().backward()
    assert y.shape == (0, 8) and torch.count_nonzero(fc1.grad) == 0 and torch.count_nonzero(table.grad) == 0
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    fc1, fc2 = (t.detach().double().requires_grad_(True) for t in (fc1, fc2))
    y = fused_nulls_swiglu(x, fc1, fc2, table.detach().double(), None, [0, 5], torch.zeros(1, 0, dtype=torch.long),
                           torch.ones(1, 0))  # k = 0: the backbone alone
    gate, up = (x @ fc1.t()).chunk(2, dim=-1)
    torch.testing.assert_close(y, (F.silu(gate) * up) @ fc2.t())

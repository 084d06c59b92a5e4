"""The sparse NULLs MLP against the masked-dense reference (the paper's way)."""
from __future__ import annotations

import pytest
import torch

from kernels.grouped_sink_swiglu import grouped_sink_swiglu
from nulls_megatron.sinks.assignment import SinkAssignment
from nulls_megatron.sinks.mlp import NullsMLP
from nulls_megatron.sinks.reference import dense_weights, masked_dense_swiglu, neuron_mask
from nulls_megatron.sinks.routing import RoutingPlan, SinkRouting
from nulls_megatron.sinks.table import normal_init

D, N_BACKBONE, N_POOL, K = 32, 8, 96, 6


def make_mlp(seed: int = 0, n_shards: int = 2, per_layer: bool = False, layer: int = 0) -> NullsMLP:
    torch.manual_seed(seed)
    assignment = SinkAssignment(N_POOL, K, n_shards=n_shards, seed=7, per_layer=per_layer)
    # Weights of order 1/sqrt(d) keep activations O(1), so atol 1e-5 is a real check.
    return NullsMLP(D, N_BACKBONE, assignment, layer_number=layer, init_method=normal_init(0.3))


def random_token_sources(gen: torch.Generator, n_sources: int, n_tokens: int) -> torch.Tensor:
    """Tokens of ``n_sources`` distinct large ids, uneven counts, shuffled order."""
    ids = torch.randperm(5_000_000, generator=gen)[:n_sources]
    weights = torch.rand(n_sources, generator=gen) + 0.05
    choice = torch.multinomial(weights, n_tokens, replacement=True, generator=gen)
    choice[:n_sources] = torch.arange(n_sources)  # every source present at least once
    return ids[choice[torch.randperm(n_tokens, generator=gen)]]


def reference_forward(mlp: NullsMLP, x: torch.Tensor, routing: SinkRouting, sources: torch.Tensor | None):
    w1, w3, w2 = dense_weights(mlp.backbone_fc1, mlp.backbone_fc2, mlp.sinks.weight)
    mask = neuron_mask(routing, sources, mlp.sinks, x.shape[0])
    return masked_dense_swiglu(x, w1, w3, w2, mask)


def outputs_and_grads(mlp: NullsMLP, fn, x: torch.Tensor, grad_out: torch.Tensor):
    mlp.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = fn(x)
    y.backward(grad_out)
    grads = {name: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for name, p in mlp.named_parameters()}
    grads["x"] = x.grad.clone()
    return y.detach(), grads


def assert_matches_reference(mlp, x, routing, sources, atol=1e-5):
    # Scaled like the gradient of a mean loss, so fp32 accumulation error stays well below atol.
    grad_out = torch.randn_like(x) / x.shape[0] ** 0.5
    y_sparse, g_sparse = outputs_and_grads(mlp, lambda t: mlp(t, routing), x, grad_out)
    y_dense, g_dense = outputs_and_grads(mlp, lambda t: reference_forward(mlp, t, routing, sources), x, grad_out)
    torch.testing.assert_close(y_sparse, y_dense, atol=atol, rtol=1e-5)
    for name in g_dense:
        torch.testing.assert_close(g_sparse[name], g_dense[name], atol=atol, rtol=1e-5, msg=lambda m: f"grad {name}: {m}")
    return y_sparse, g_sparse


@pytest.mark.parametrize("case", range(8))
def test_train_mode_equals_masked_dense_for_random_source_mixes(case):
    gen = torch.Generator().manual_seed(case)
    n_sources = [1, 2, 5, 13, 50, 37, 3, 24][case]
    mlp = make_mlp(seed=case, n_shards=[1, 2, 4][case % 3])
    tokens = int(torch.randint(n_sources, 200, (1,), generator=gen)) + n_sources
    sources = random_token_sources(gen, n_sources, tokens)
    x = torch.randn(tokens, D, generator=gen)
    routing = SinkRouting.train(sources)
    y, grads = assert_matches_reference(mlp, x, routing, sources)

    # The check is not vacuous: the sinks change the output materially.
    y_backbone = reference_forward(mlp, x, SinkRouting.backbone_only(), None)
    assert (y - y_backbone).abs().max() > 0.1

    # Sinks owned by no token of the batch get exactly zero gradient; owned ones do not.
    owned = torch.zeros(N_POOL, dtype=torch.bool)
    owned[mlp.sinks.assignment.sinks_of(sources.unique()).reshape(-1)] = True
    sink_grad = grads["sinks.weight"]
    assert torch.count_nonzero(sink_grad[~owned]) == 0
    assert bool((sink_grad[owned].abs().sum(dim=(1, 2)) > 0).all())


def test_batched_3d_input_and_already_grouped_tokens():
    mlp = make_mlp(seed=3)
    gen = torch.Generator().manual_seed(3)
    sources = torch.tensor([4] * 10 + [9] * 6 + [2] * 16).view(2, 16)
    x = torch.randn(2, 16, D, generator=gen)
    routing = SinkRouting.train(sources)
    assert routing.plan.perm is not None  # unique() sorts ids, so 4, 9, 2 is not grouped order
    grouped = SinkRouting.train(torch.tensor([2] * 5 + [4] * 7))
    assert grouped.plan.perm is None
    y = mlp(x, routing)
    ref = reference_forward(mlp, x.view(-1, D), routing, sources).view_as(y)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_disabled_sinks_are_off_and_get_no_gradient():
    gen = torch.Generator().manual_seed(11)
    mlp = make_mlp(seed=11)
    sources = random_token_sources(gen, 6, 120)
    forgotten = sources[0:1]
    rows = mlp.sinks.assignment.sinks_of(forgotten)[0]
    mlp.sinks.disabled[rows] = True
    x = torch.randn(120, D, generator=gen)
    routing = SinkRouting.train(sources)
    y, grads = assert_matches_reference(mlp, x, routing, sources)
    assert torch.count_nonzero(grads["sinks.weight"][rows]) == 0
    # Tokens of the forgotten source now see the plain (unscaled) backbone and no sink at all.
    own = sources == forgotten
    w1, w3, w2 = dense_weights(mlp.backbone_fc1, mlp.backbone_fc2, mlp.sinks.weight)
    backbone_mask = torch.cat((torch.ones(120, N_BACKBONE), torch.zeros(120, N_POOL)), 1)
    plain_backbone = masked_dense_swiglu(x, w1, w3, w2, backbone_mask).detach()
    torch.testing.assert_close(y[own], plain_backbone[own], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(y[~own], plain_backbone[~own], atol=1e-3)


def test_route_mode_one_source_and_per_token():
    gen = torch.Generator().manual_seed(5)
    mlp = make_mlp(seed=5)
    x = torch.randn(40, D, generator=gen)
    routing = SinkRouting.route(123_456, like=x[:, 0])
    assert_matches_reference(mlp, x, routing, torch.full((40,), 123_456))
    per_token = random_token_sources(gen, 4, 40)
    assert_matches_reference(mlp, x, SinkRouting.route(per_token), per_token)
    with pytest.raises(ValueError, match="like"):
        SinkRouting.route(3)


def test_expected_and_backbone_modes_match_their_formulas():
    gen = torch.Generator().manual_seed(8)
    mlp = make_mlp(seed=8)
    mlp.sinks.disabled[torch.arange(0, N_POOL, 5)] = True
    x = torch.randn(30, D, generator=gen)
    p_mem = K / N_POOL
    p_gen = N_BACKBONE / (N_BACKBONE + N_POOL)
    w1, w3, w2 = (w.detach() for w in dense_weights(mlp.backbone_fc1, mlp.backbone_fc2, mlp.sinks.weight))
    live = (~mlp.sinks.disabled).float()

    expected_mask = torch.cat((torch.ones(N_BACKBONE), live * p_mem)).expand(30, -1)
    y = mlp(x, SinkRouting.expected())
    torch.testing.assert_close(y, masked_dense_swiglu(x, w1, w3, w2, expected_mask), atol=1e-5, rtol=1e-5)
    assert_matches_reference(mlp, x, SinkRouting.expected(), None)

    scale = (p_gen + p_mem) / p_gen
    backbone_mask = torch.cat((torch.full((N_BACKBONE,), scale), torch.zeros(N_POOL))).expand(30, -1)
    y, grads = assert_matches_reference(mlp, x, SinkRouting.backbone_only(), None)
    torch.testing.assert_close(y, masked_dense_swiglu(x, w1, w3, w2, backbone_mask), atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(grads["sinks.weight"]) == 0


def test_per_layer_sinks_and_plan_cache():
    gen = torch.Generator().manual_seed(2)
    sources = random_token_sources(gen, 7, 60)
    x = torch.randn(60, D, generator=gen)
    shared = [make_mlp(seed=2, layer=layer) for layer in (0, 1)]
    salted = [make_mlp(seed=2, per_layer=True, layer=layer) for layer in (0, 1)]
    routing = SinkRouting.train(sources)
    for mlp in shared:
        mlp(x, routing)
    assert len(routing.plan._rows) == 1  # one assignment lookup serves every layer
    routing_salted = SinkRouting.train(sources)
    for mlp in salted:
        assert_matches_reference(mlp, x, routing_salted, sources)
    assert len(routing_salted.plan._rows) == 2
    rows0, rows1 = routing_salted.plan._rows.values()
    assert not torch.equal(rows0, rows1)


def test_kernel_rejects_inconsistent_shapes_and_routing_rejects_bad_ids():
    x = torch.randn(4, 8)
    table = torch.randn(10, 3, 8)
    with pytest.raises(ValueError, match=r"table \[R, 3, d\]"):
        grouped_sink_swiglu(x, torch.randn(10, 2, 8), None, [0, 4], torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2))
    with pytest.raises(ValueError, match="len\\(offsets\\)"):
        grouped_sink_swiglu(x, table, None, [0, 2, 4], torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2))
    with pytest.raises(ValueError, match="offsets must rise from 0 to the number of tokens \\(4\\)"):
        grouped_sink_swiglu(x, table, None, [0, 3], torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2))
    with pytest.raises(ValueError, match="source id -3 at token 1"):
        RoutingPlan.from_token_sources(torch.tensor([1, -3, 2]))
    with pytest.raises(TypeError, match="int32 or int64"):
        RoutingPlan.from_token_sources(torch.tensor([1.0, 2.0]))
    mlp = make_mlp()
    with pytest.raises(ValueError, match="built for 3 tokens but the layer got 4"):
        mlp(torch.randn(4, D), SinkRouting.train(torch.tensor([1, 2, 3])))


@pytest.mark.parametrize("grouped", [True, False])
def test_kernel_backward_passes_gradcheck(grouped):
    """The hand-written backward against finite differences (float64), with and without
    a permutation, with a ``base`` and with gates that scale or switch sinks off."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(9, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    table = torch.randn(12, 3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    base = torch.randn(9, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    row_ids = torch.tensor([[0, 3, 7], [3, 5, 11], [1, 2, 9]])
    gates = torch.tensor([[1.0, 0.0, 1.0], [0.5, 1.0, 1.0], [1.0, 1.0, 2.0]], dtype=torch.float64)
    perm = None if grouped else torch.randperm(9, generator=gen)
    offsets = [0, 2, 6, 9]

    def fn(x, table, base):
        return grouped_sink_swiglu(x, table, perm, offsets, row_ids, gates, base=base)

    assert torch.autograd.gradcheck(fn, (x, table, base))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_adds_the_table_gradient_into_a_main_grad_buffer(dtype):
    """grad_table_into (Megatron's fp32 main_grad): the rows' gradients are added into the buffer,
    across calls, equal to the table gradient autograd returns otherwise; the table is flagged
    grad_added_to_main_grad so that Megatron's DDP hook skips the placeholder."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(40, 8, generator=gen).to(dtype)
    table = torch.nn.Parameter(torch.randn(30, 3, 8, generator=gen).to(dtype))
    row_ids = torch.tensor([[0, 4, 9], [4, 7, 29], [1, 2, 3]])
    gates = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    perm, offsets = torch.randperm(40, generator=gen), [0, 10, 25, 40]
    grad_y = torch.randn(40, 8, generator=gen).to(dtype)

    grouped_sink_swiglu(x, table, perm, offsets, row_ids, gates).backward(grad_y)
    expected = table.grad.float().clone()
    table.grad = None
    main_grad = torch.zeros(30, 3, 8, dtype=torch.float32)
    main_grad[5] = 1.0  # earlier micro-batches' sums stay and are added to
    table.grad_added_to_main_grad = False
    for _ in range(2):
        grouped_sink_swiglu(x, table, perm, offsets, row_ids, gates, grad_table_into=main_grad).backward(grad_y)
    assert table.grad_added_to_main_grad and table.grad.shape == table.shape
    tol = 1e-6 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(main_grad[5], torch.ones(3, 8))
    untouched = torch.ones(30, dtype=torch.bool)
    untouched[row_ids.reshape(-1)] = False
    untouched[5] = False
    assert torch.count_nonzero(main_grad[untouched]) == 0
    torch.testing.assert_close(main_grad[row_ids.reshape(-1)], 2 * expected[row_ids.reshape(-1)], atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="grad_table_into"):
        grouped_sink_swiglu(x, table, perm, offsets, row_ids, gates, grad_table_into=torch.zeros(3))

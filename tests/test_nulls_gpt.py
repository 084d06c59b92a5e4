"""The NULLs GPT inside Megatron-core: forward/backward with source ids, packed-row
isolation, modes, agreement with the plain-torch NULLs MLP, and TP=2 == TP=1."""
from __future__ import annotations

import pytest
import torch

import kernels.fused_nulls_swiglu as fused_nulls_swiglu
from launch.local import run_local
from nulls_megatron.sinks.mlp import NullsMLP
from nulls_megatron.sinks.routing import SinkRouting
from tests.nulls_gpt_helpers import gather_full, init_single_process_megatron, megatron_world, packed_batch, tiny_config  # noqa: F401 (fixture)

STEPS, LR = 3, 0.5


def build(cfg=None):
    from nulls_megatron.compat import model_parallel_seed
    from nulls_megatron.model.gpt import build_nulls_gpt

    model_parallel_seed(1234)
    return build_nulls_gpt(cfg or tiny_config())


def test_forward_backward_with_source_ids_touches_only_owned_sinks(megatron_world):
    model = build()
    inputs, labels, sources = packed_batch()
    loss = model(inputs, labels=labels, source_ids=sources)
    assert loss.shape == inputs.shape and torch.isfinite(loss).all()
    loss.mean().backward()
    owned = torch.zeros(model.cfg.nulls.n_pool, dtype=torch.bool)
    mlps = model.nulls_mlps()
    owned[mlps[0].sinks.assignment.sinks_of(sources.unique()).reshape(-1)] = True
    assert len(mlps) == model.cfg.model.num_layers
    for mlp in mlps:
        grad = mlp.sinks.weight.grad
        assert torch.count_nonzero(grad[~owned]) == 0
        assert bool((grad[owned].abs().sum(dim=(1, 2)) > 0).all())
        assert mlp.linear_fc1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("per_layer", [False, True], ids=["shared-sinks", "per-layer-sinks"])
def test_routing_planned_ahead_equals_routing_in_the_forward(megatron_world, monkeypatch, per_layer):
    """The trainer's loader thread plans each micro-batch's routing (train.trainer.routing_planner):
    the forward and backward then give the same numbers, and neither group tokens nor hash sources
    (both would raise here), so nothing waits for the host on a GPU."""
    import dataclasses

    from nulls_megatron.model.gpt import train_routing_plan
    from nulls_megatron.sinks.assignment import SinkAssignment
    from nulls_megatron.sinks.routing import RoutingPlan
    from nulls_megatron.train.device import batch_to_device
    from nulls_megatron.train.trainer import routing_planner
    from tests.nulls_gpt_helpers import packed_micro_batches

    cfg = tiny_config(per_layer_sinks=per_layer)
    model = build(cfg)
    batch = packed_micro_batches(3)[0]
    inputs, labels, sources = batch.tokens, batch.labels, batch.source_ids
    expected = model(inputs, labels=labels, source_ids=sources)
    expected.mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    planned = batch_to_device(routing_planner(cfg)(batch), torch.device("cpu"))
    assert planned.routing is not None and len(planned.routing._rows) == (cfg.model.num_layers if per_layer else 1)

    def refuse(*args, **kwargs):
        raise AssertionError("the forward planned routing although the loader had")

    monkeypatch.setattr(RoutingPlan, "from_token_sources", classmethod(refuse))
    monkeypatch.setattr(SinkAssignment, "sinks_of_np", refuse)
    loss = model(inputs, labels=labels, source_ids=sources, routing_plan=planned.routing)
    loss.mean().backward()
    assert torch.equal(loss, expected)
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="routing_plan covers"):
        model(inputs[:1], labels=labels[:1], source_ids=sources[:1], routing_plan=planned.routing)
    monkeypatch.undo()
    again = train_routing_plan(sources)
    assert again.offsets == planned.routing.offsets and torch.equal(again.sources, planned.routing.sources)
    assert dataclasses.replace(planned, routing=None).routing is None


def test_parameter_counts_match_the_built_model(megatron_world):
    from nulls_megatron.model_size import parameter_counts

    cfg = tiny_config()
    model = build(cfg)
    counts = parameter_counts(cfg)
    assert sum(p.numel() for p in model.parameters()) == counts["total"]
    assert sum(m.sinks.weight.numel() for m in model.nulls_mlps()) == counts["sinks"]


def test_packed_documents_do_not_see_each_other(megatron_world):
    model = build()
    inputs, _, sources = packed_batch()
    changed = inputs.clone()
    changed[0, :10] = (changed[0, :10] + 17) % 128  # rewrite document of source 7 only
    with torch.no_grad():
        logits = model(inputs, source_ids=sources)
        logits_changed = model(changed, source_ids=sources)
        # logits are [b, s, vocab]
        assert not torch.allclose(logits[0, :10], logits_changed[0, :10])
        torch.testing.assert_close(logits[0, 10:], logits_changed[0, 10:], atol=0, rtol=0)
        torch.testing.assert_close(logits[1], logits_changed[1], atol=0, rtol=0)
        # The check can fail: with a plain causal mask the later documents do change.
        causal = torch.triu(torch.ones(inputs.shape[1], inputs.shape[1], dtype=torch.bool), 1)[None, None]
        plain = model(inputs, source_ids=sources, attention_mask=causal.expand(2, 1, -1, -1))
        plain_changed = model(changed, source_ids=sources, attention_mask=causal.expand(2, 1, -1, -1))
        assert not torch.allclose(plain[0, 10:], plain_changed[0, 10:])


@pytest.mark.parametrize("per_layer", [False, True])
def test_modes_through_the_model(megatron_world, per_layer):
    model = build(tiny_config(per_layer_sinks=per_layer))
    inputs, labels, sources = packed_batch()
    with torch.no_grad():
        train = model(inputs, labels=labels, source_ids=sources)
        routed_to_own = model(inputs, labels=labels, source_ids=sources, sink_mode="route", route_sources=sources)
        torch.testing.assert_close(train, routed_to_own, atol=0, rtol=0)
        for mode in ("expected", "backbone"):
            other = model(inputs, labels=labels, source_ids=sources, sink_mode=mode)
            assert not torch.allclose(other, train)
        one = model(inputs, labels=labels, source_ids=sources, sink_mode="route", route_sources=3)
        assert not torch.allclose(one, train)
        # Forgetting every source of the batch: disable its sinks, each layer's own rows (with per-layer
        # sinks a source's rows differ by layer, so layer 0's rows would leave the others' on).
        mlps = model.nulls_mlps()
        rows = [mlp.sinks.assignment.sinks_of(sources.unique(), layer=mlp.sinks.layer_number).reshape(-1) for mlp in mlps]
        assert (not torch.equal(rows[0], rows[1])) is per_layer
        for mlp, layer_rows in zip(mlps, rows):
            mlp.sinks.disabled[layer_rows] = True
        forgotten = model(inputs, labels=labels, source_ids=sources)
        assert not torch.allclose(forgotten, train)
        # == the whole pool off: no sink of the batch's sources is left on in any layer.
        for mlp in mlps:
            mlp.sinks.disabled[:] = True
        torch.testing.assert_close(model(inputs, labels=labels, source_ids=sources), forgotten, atol=0, rtol=0)
        # == backbone-only mode at unit scale (that mode also rescales the backbone by (p_gen + p_mem) / p_gen).
        for mlp in mlps:
            mlp.sinks.disabled[:] = False
            mlp.sinks.backbone_scale = lambda routing: 1.0
        backbone_unit = model(inputs, labels=labels, source_ids=sources, sink_mode="backbone")
        for mlp in mlps:
            del mlp.sinks.backbone_scale
        torch.testing.assert_close(backbone_unit, forgotten, atol=1e-6, rtol=0)
        assert not torch.allclose(model(inputs, labels=labels, source_ids=sources, sink_mode="backbone"), forgotten)
    with pytest.raises(ValueError, match="route_sources"):
        model(inputs, source_ids=sources, sink_mode="route")


@pytest.mark.parametrize("fused", [False, True])
def test_megatron_mlp_equals_plain_torch_nulls_mlp(megatron_world, monkeypatch, fused):
    """The Megatron module computes exactly the plain-torch layer that tests/test_nulls_mlp.py
    checks against the masked-dense reference; also on the fused path of long sources (taken here
    from one token per source on, kernels/fused_nulls_swiglu.py), gradients included."""
    if fused:
        monkeypatch.setattr(fused_nulls_swiglu, "FUSE_FROM", 1)
    cfg = tiny_config(per_layer_sinks=True)
    model = build(cfg)
    mlp = model.nulls_mlps()[1]
    plain = NullsMLP(64, cfg.nulls.n_backbone, mlp.sinks.assignment, layer_number=mlp.sinks.layer_number)
    with torch.no_grad():
        plain.backbone_fc1.copy_(mlp.linear_fc1.weight)
        plain.backbone_fc2.copy_(mlp.linear_fc2.weight)
        plain.sinks.weight.copy_(mlp.sinks.weight)
    _, _, sources = packed_batch()
    x = torch.randn(sources.shape[1], sources.shape[0], 64)  # Megatron's [s, b, h]
    model.routing_context.routing = model._routing(sources, SinkRouting.train(sources).mode, None)
    x_megatron, x_plain = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_megatron, bias = mlp(x_megatron)
    y_plain = plain(x_plain.reshape(-1, 64), SinkRouting.train(sources.t().reshape(-1))).view_as(x)
    model.routing_context.routing = None
    assert bias is None
    torch.testing.assert_close(y_megatron, y_plain, atol=1e-6, rtol=1e-5)
    grad_out = torch.randn_like(x)
    y_megatron.backward(grad_out)
    y_plain.backward(grad_out)
    for got, want in ((x_megatron.grad, x_plain.grad), (mlp.linear_fc1.weight.grad, plain.backbone_fc1.grad),
                      (mlp.linear_fc2.weight.grad, plain.backbone_fc2.grad), (mlp.sinks.weight.grad, plain.sinks.weight.grad)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert mlp.sinks.layer_number == 1


def tp_steps(rank: int, world_size: int, tensor_parallel: int, fuse_from: int | None = None) -> dict:
    """A few SGD steps of the NULLs GPT at the given TP size; losses and full gradients. With
    ``fuse_from``, sources of that many tokens on average take the fused MLP (at TP 1)."""
    if fuse_from is not None:
        fused_nulls_swiglu.FUSE_FROM = fuse_from
    init_single_process_megatron(tensor_parallel=tensor_parallel)
    model = build(tiny_config(tensor_parallel=tensor_parallel))
    inputs, labels, sources = packed_batch()
    losses, grads = [], []
    for _ in range(STEPS):
        model.zero_grad(set_to_none=True)
        loss = model(inputs, labels=labels, source_ids=sources).mean()
        loss.backward()
        losses.append(loss.item())
        grads.append({n: gather_full(p, p.grad) for n, p in model.named_parameters()})
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
    return {"losses": losses, "grads": grads}


def tp_equivalence_worker(rank: int, world_size: int) -> dict:
    tp2 = tp_steps(rank, world_size, tensor_parallel=2)
    tp1 = tp_steps(rank, world_size, tensor_parallel=1)
    tp1_fused = tp_steps(rank, world_size, tensor_parallel=1, fuse_from=1)
    return {"tp1": tp1, "tp2": tp2, "tp1 fused": tp1_fused}


@pytest.fixture(scope="module")
def tp_equivalence_results() -> list[dict]:
    return run_local(tp_equivalence_worker, 2, timeout=240)


@pytest.mark.parametrize("tp1_path", ["tp1", "tp1 fused"])
def test_tensor_parallel_2_equals_1(tp1_path, tp_equivalence_results):
    """TP 2 (separate backbone and sinks) against TP 1, the MLP computed apart or fused."""
    for rank, result in enumerate(tp_equivalence_results):
        tp1, tp2 = result[tp1_path], result["tp2"]
        assert tp1["losses"][0] > tp1["losses"][-1], "SGD steps should lower the loss on a fixed batch"
        for step in range(STEPS):
            assert abs(tp1["losses"][step] - tp2["losses"][step]) < 1e-5, (rank, step, tp1["losses"], tp2["losses"])
            assert tp1["grads"][step].keys() == tp2["grads"][step].keys()
            for name, g1 in tp1["grads"][step].items():
                torch.testing.assert_close(
                    tp2["grads"][step][name], g1, atol=1e-5, rtol=1e-4, msg=lambda m: f"rank {rank} step {step} {name}: {m}"
                )


def test_bf16_model_through_float16_module_follows_the_fp32_model(megatron_world):
    """The GPU training path's model side on CPU: built in bf16 (train/precision.py), wrapped in
    Megatron's Float16Module as the Megatron engine does; sinks route in bf16 and gradients reach
    only the owned sink rows."""
    from megatron.core.transformer.module import Float16Module

    from nulls_megatron.train.precision import bf16_model_overrides

    from nulls_megatron.model.gpt import build_nulls_gpt

    reference = build()
    model = build_nulls_gpt(tiny_config(), **bf16_model_overrides())
    wrapped = Float16Module(model.config, model)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        for p, q in zip(model.parameters(), reference.parameters()):
            p.copy_(q)
    tokens, labels, sources = packed_batch()
    loss = wrapped(tokens, labels=labels, source_ids=sources)
    assert loss.dtype == torch.float32, "Float16Module hands the last stage's output back in fp32"
    expected = reference(tokens, labels=labels, source_ids=sources)
    assert (loss.mean() - expected.mean()).abs() < 0.02 * expected.mean()
    loss.mean().backward()
    table = model.nulls_mlps()[0].sinks
    owned = table.assignment.sinks_of(sources.unique()).unique()
    touched = table.weight.grad.abs().sum(dim=(1, 2)).nonzero().squeeze(1)
    assert set(touched.tolist()) <= set(owned.tolist()) and touched.numel() > 0


def test_precision_is_bf16_on_gpu_and_fp32_on_cpu():
    from nulls_megatron.config import ConfigError, Precision
    from nulls_megatron.train.precision import use_bf16

    cfg = tiny_config()
    cfg.train.precision = Precision.AUTO
    assert use_bf16(cfg) is torch.cuda.is_available()
    cfg.train.precision = Precision.FP32
    assert use_bf16(cfg) is False
    if not torch.cuda.is_available():
        cfg.train.precision = Precision.BF16
        with pytest.raises(ConfigError, match="train.precision: bf16 trains on GPUs only"):
            use_bf16(cfg)


@pytest.mark.parametrize("tie", [True, False])
def test_scaling_estimate_counts_every_parameter_of_the_built_model(megatron_world, tie):
    """docs/scaling.md's memory per GPU rests on benchmarks/scaling_estimate.total_params: it must count
    exactly what build_nulls_gpt builds (here the tiny config; the paper's is the same formula)."""
    from tests.benchmark_helpers import load_benchmark

    scaling = load_benchmark("scaling_estimate")
    cfg = tiny_config(tie_embeddings=tie)
    assert scaling.total_params(cfg) == sum(p.numel() for p in build(cfg).parameters())
    replicated, sharded = scaling.state_bytes_per_gpu(1000, 4)
    assert (replicated, sharded) == (18000, 9000)

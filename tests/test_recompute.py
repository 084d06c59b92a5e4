"""Activation recomputation (``model.recompute``, nulls_megatron/model/recompute.py): the same loss and
gradients as without it, each micro-batch recomputed with its own routing and mask even when several
are in flight, and the option read from YAML by the trainer's config path."""
from __future__ import annotations

import pytest
import torch
import yaml

from nulls_megatron.config import ConfigError, load_config
from tests.nulls_gpt_helpers import BATCH, SEQ, VOCAB, packed_micro_batches, tiny_config
from tests.nulls_gpt_helpers import megatron_world  # noqa: F401 (a fixture)


def config(recompute: str = "none", backend: str = "sdpa"):
    cfg = tiny_config(per_layer_sinks=True)
    cfg.model.attention_backend, cfg.model.recompute = backend, recompute
    return cfg.validate()


def build(recompute: str = "none", backend: str = "sdpa", like=None, **overrides):
    """A model with ``like``'s weights (or freshly seeded ones)."""
    from nulls_megatron.compat import model_parallel_seed
    from nulls_megatron.model.gpt import build_nulls_gpt

    model_parallel_seed(1234)
    model = build_nulls_gpt(config(recompute, backend), **overrides)
    if like is not None:
        model.load_state_dict(like.state_dict())
    return model


def batch(seed: int, sources: tuple[int, ...]):
    """Packed rows holding ``sources`` in runs, and documents that do not follow the sources: two
    documents of one source side by side, and a document spanning two sources' runs is cut by both."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    bounds = torch.linspace(0, SEQ, len(sources) + 1).long()
    src = torch.empty(BATCH, SEQ, dtype=torch.int64)
    for i, s in enumerate(sources):
        src[:, bounds[i]:bounds[i + 1]] = s
    src[1] = src[1].flip(0)
    docs = torch.cumsum(torch.ne(src[:, 1:], src[:, :-1]).long(), 1)
    docs = torch.cat([torch.zeros(BATCH, 1, dtype=torch.int64), docs], 1)
    docs[0, 3:] += 1  # a second document of the first source
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), src, docs


def forward(model, inputs, labels, sources, docs):
    loss = model(inputs, labels=labels, source_ids=sources, document_ids=docs)
    # Unequal weights per token, so that no gradient is the plain mean's.
    return (loss * torch.linspace(0.5, 1.5, loss.numel()).view_as(loss)).sum()


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_same(got: dict, expected: dict, what: str) -> None:
    assert got.keys() == expected.keys(), what
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, atol=0, rtol=0, msg=lambda m: f"{what}: {name}: {m}")


def run(model, data, seed: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss and gradients of one forward and backward (after reseeding every RNG stream when ``seed``)."""
    from nulls_megatron.compat import model_parallel_seed

    if seed is not None:
        model_parallel_seed(seed)
    loss = forward(model, *data)
    loss.backward()
    return loss.detach(), grads(model)


def assert_same_run(got: tuple, expected: tuple, what: str) -> None:
    torch.testing.assert_close(got[0], expected[0], atol=0, rtol=0, msg=lambda m: f"{what}: loss: {m}")
    assert_same(got[1], expected[1], what)


def saved_bytes(model, data) -> int:
    """Bytes the forward saves for backward through autograd (a checkpoint keeps its inputs outside it)."""
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        forward(model, *data)
    return sum(sizes)


def test_recompute_key_from_yaml_and_bad_values_refused(tmp_path):
    assert load_config("configs/demo_cpu.yaml").model.recompute == "none"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"recompute": "full"}}))
    assert load_config(path).model.recompute == "full"
    assert load_config(path, ["model.recompute=none"]).model.recompute == "none"
    with pytest.raises(ConfigError, match=r"model\.recompute: expected one of none, full, selective, got 'always'"):
        load_config(path, ["model.recompute=always"])
    with pytest.raises(ConfigError, match=r"model\.recompute: selective .* masked alone; with 'auto' use full"):
        load_config(path, ["model.recompute=selective"])
    cfg = load_config(path, ["model.recompute=selective", "model.attention_backend=masked"])
    assert (cfg.model.recompute, cfg.model.attention_backend) == ("selective", "masked")


@pytest.mark.parametrize("backend", ["sdpa", "masked"])
def test_full_recompute_equals_no_recompute(megatron_world, backend):
    """Loss and the gradient of every parameter (backbone, attention, embeddings, per-layer sink tables),
    fp32, in train mode; the layers really run twice, and the forward keeps far fewer activations."""
    plain = build("none", backend)
    full = build("full", backend, like=plain)
    data = batch(0, (7, 3, 900_001, 42))
    expected = run(plain, data)
    assert len(expected[1]) == len(list(plain.parameters()))
    calls = []
    for mlp in full.nulls_mlps():
        mlp.register_forward_pre_hook(lambda module, args: calls.append(module))
    assert_same_run(run(full, data), expected, backend)
    assert len(calls) == 2 * len(full.nulls_mlps()), "each layer runs once in forward and once in backward"
    assert full.routing_context.routing is None and not full.attention_context.ready, "cleared after the forward"
    assert saved_bytes(full, data) < saved_bytes(plain, data) / 3


def test_full_recompute_replays_dropout(megatron_world):
    """Attention dropout draws from Megatron's RNG tracker (tensor-parallel stream), hidden dropout from the
    default generator: a recomputed layer must draw the masks its forward drew."""
    dropout = dict(attention_dropout=0.3, hidden_dropout=0.2)
    plain = build("none", **dropout)
    full = build("full", like=plain, **dropout)
    data = batch(1, (5, 8))
    assert_same_run(run(full, data, seed=99), run(plain, data, seed=99), "dropout")


def test_micro_batches_in_flight_are_recomputed_with_their_own_routing(megatron_world):
    """As under 1F1B: A and B forwarded before either backward. Each backward must give the gradients of
    running it alone, also while the model's live contexts hold the other micro-batch's routing and mask
    (which is what a recompute reading the live contexts would use)."""
    from nulls_megatron.model.gpt import NullsGPTModel
    from nulls_megatron.sinks.routing import SinkMode

    model = build("full")
    a, b = batch(2, (7, 3, 11)), batch(3, (900_001, 42, 5))
    # As many sources in A as in B: a wrong routing gives the same shapes, and only the values tell.
    alone = [run(model, data)[1] for data in (a, b)]
    sink_rows = [{n: set(g.abs().sum(dim=(1, 2)).nonzero().flatten().tolist()) for n, g in gs.items() if "sinks" in n}
                 for gs in alone]
    assert all(sink_rows[0][n] != sink_rows[1][n] for n in sink_rows[0]), "A's and B's sinks must differ"

    loss_a, loss_b = forward(model, *a), forward(model, *b)
    model.routing_context.routing = NullsGPTModel._routing(b[2], SinkMode.TRAIN, None)
    model.attention_context.prepare(b[3])
    live = (model.routing_context.routing, model.attention_context.mask)
    loss_a.backward()
    assert (model.routing_context.routing, model.attention_context.mask) == live, "the live contexts are put back"
    assert_same(grads(model), alone[0], "A with B's routing live")
    model.routing_context.routing, model.attention_context.mask = None, None
    loss_b.backward()
    assert_same(grads(model), alone[1], "B after A")


@pytest.mark.filterwarnings("ignore:If you are using transformer_engine")  # Megatron's note on TE's fused attention
def test_selective_recompute_of_masked_core_attention(megatron_world):
    """Megatron's core-attention recompute on the masked backend (the mask is an argument, so it is replayed);
    combinations that would re-run a context reader after its forward are refused at build time."""
    plain = build("none", "masked")
    selective = build("selective", "masked", like=plain)
    assert all(layer.self_attention.checkpoint_core_attention for layer in selective.decoder.layers)
    data = batch(4, (7, 3, 42))
    assert_same_run(run(selective, data), run(plain, data), "selective")

    with pytest.raises(ValueError, match="set model.recompute: full instead"):
        build(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    with pytest.raises(ValueError, match="needs the masked attention backend, not 'sdpa'"):
        build(recompute_granularity="selective")
    with pytest.raises(ValueError, match=r"only \['core_attn'\]"):
        build(backend="masked", recompute_granularity="selective", recompute_modules=["core_attn", "mlp"])


@pytest.mark.parametrize("engine_name", ["megatron", "deepspeed"])
def test_trainer_builds_and_steps_with_recompute_from_yaml(megatron_world, tmp_path, engine_name):
    """The trainer's path: YAML -> load_config -> build_model_and_engine -> one step of either engine over
    two micro-batches; the same loss, grad norm and updated weights as without recompute."""
    from nulls_megatron.compat import model_parallel_seed
    from nulls_megatron.train.trainer import build_model_and_engine

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config("full").to_dict()))
    results = {}
    for recompute in ("none", "full"):
        cfg = load_config(path, [f"model.recompute={recompute}", f"train.engine={engine_name}"])
        model_parallel_seed(1234)
        engine = build_model_and_engine(cfg, 2)
        layers = engine.module.decoder.layers
        assert all((layer.forward_contexts is not None) == (recompute == "full") for layer in layers)
        loss, norm = engine.train_step(packed_micro_batches(), lr=1e-2)
        results[recompute] = loss, norm, {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    (loss0, norm0, params0), (loss1, norm1, params1) = results["none"], results["full"]
    assert (loss1, norm1) == (loss0, norm0)
    assert_same(params1, params0, "after one optimizer step")

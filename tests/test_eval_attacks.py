"""Post-hoc baselines (GA, NPO), the relearning attack, sustainability and the dense model of the active
size, on the session's trained model (in this process: no new launches)."""
from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager

import pytest
import torch

from nulls_megatron.eval.baselines import dense_active_config, mean_loss, npo_loss, unlearn_posthoc
from nulls_megatron.eval.documents import prep_documents
from nulls_megatron.eval.relearn import best_recovery, halfway_step, relearn, split_halves
from nulls_megatron.eval.scoring import CheckpointModel
from nulls_megatron.eval.sustainability import capped_sizes, sustainability
from tests.conftest import GROUP_SOURCES
from tests.train_helpers import train_config


@pytest.fixture(scope="module")
def model(trained_run) -> CheckpointModel:
    return CheckpointModel(trained_run.checkpoint)


@pytest.fixture(scope="module")
def forget(trained_run):
    return prep_documents(trained_run.prep_dir, lambda s: s in GROUP_SOURCES)


def test_npo_loss_by_hand():
    # Two sequences: the model is 1 nat less likely than the reference on one, 1 nat more on the other.
    got = npo_loss(torch.tensor([-12.0, -10.0]), torch.tensor([-11.0, -11.0]), beta=0.1)
    log_sigmoid = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    want = -(2 / 0.1) * (log_sigmoid(-0.1 * -1.0) + log_sigmoid(-0.1 * 1.0)) / 2
    assert float(got) == pytest.approx(want, rel=1e-6)
    assert float(npo_loss(torch.zeros(3), torch.zeros(3))) == pytest.approx(20 * math.log(2), rel=1e-6)


def test_halfway_step_on_synthetic_curves():
    before = 3.0
    assert halfway_step([5.0, 4.6, 4.2, 3.9, 3.5], before) == 3  # target 4.0
    assert halfway_step([5.0, 4.0], before) == 1  # reaching the target exactly counts
    assert halfway_step([5.0, 4.9, 4.8], before) is None
    assert halfway_step([2.9, 3.5], before) == 0  # never above the pre-unlearning loss


def test_best_recovery_is_the_largest_share_undone_at_any_step():
    before = 3.0
    # Down to 4.2 (0.4 of the gap of 2.0), then back up as the attack overfits: the best share stays 0.4.
    assert best_recovery([5.0, 4.6, 4.2, 4.5, 4.9], before) == pytest.approx(0.4)
    assert best_recovery([5.0, 2.5], before) == pytest.approx(1.25)  # past the pre-unlearning loss
    assert best_recovery([5.0, 5.1], before) == 0.0
    assert math.isnan(best_recovery([2.9, 2.5], before))  # unlearning raised nothing to undo


def test_ga_and_npo_raise_the_forget_loss_deterministically(model, forget):
    start = mean_loss(model, forget, "own")
    for method in ("ga", "npo"):
        unlearned = unlearn_posthoc(model, forget, method, steps=4)
        raised = mean_loss(unlearned, forget, "own")
        assert raised > start + 0.05, (method, start, raised)
        assert mean_loss(unlearn_posthoc(model, forget, method, steps=4), forget, "own") == raised  # seeded
    assert mean_loss(model, forget, "own") == start  # the given model is not changed
    retained = prep_documents(model.loaded.sources.prep_dir, lambda s: s in (0, 1))
    with_retain = unlearn_posthoc(model, forget, "npo", retain=retained, steps=4)  # open-unlearning's NPO
    assert mean_loss(with_retain, forget, "own") > start


def test_relearning_curve_after_gradient_ascent(model, forget):
    _, second = split_halves(forget)
    before = mean_loss(model, second, "own")
    unlearned = unlearn_posthoc(model, forget, "ga", steps=4)
    result = relearn(unlearned, forget, before, mode="own", steps=3)
    assert len(result.curve) == 3 + 1 and result.curve[0] == pytest.approx(mean_loss(unlearned, second, "own"))
    assert result.curve[-1] < result.curve[0]  # fine-tuning on the first halves helps the second halves
    assert result.steps_to_halfway == halfway_step(result.curve, before)
    assert json.dumps(result.to_json())
    with pytest.raises(ValueError, match="needs routes"):
        relearn(unlearned, forget, before, mode="nearest", steps=1)


def test_relearning_a_model_with_its_sources_off(model, forget):
    # As an unlearned NULLs model (or an oracle made comparable) is attacked: the forgotten rows off,
    # the documents routed to surviving sources (here fixed ones, standing in for the nearest).
    routes = [0, 1, 2]
    _, second = split_halves(forget)
    before = mean_loss(model, second, "nearest", routes)
    with model.sources_disabled(GROUP_SOURCES):
        start = mean_loss(model, second, "nearest", routes)
        result = relearn(model, forget, before, mode="nearest", routes=routes, steps=2)
    assert result.curve[0] == pytest.approx(start) and len(result.curve) == 3
    assert mean_loss(model, second, "nearest", routes) == before  # flags restored, weights untouched


def test_sustainability_on_a_copy(trained_run, tmp_path):
    run = trained_run.copy_to(tmp_path)
    latest = (run.root / "latest").read_text()
    versions = sorted(p.name for p in run.root.iterdir())
    lines: list[str] = []
    result = sustainability(run.checkpoint, tmp_path / "sus", sizes=(3, 1), retain_docs=8, say=lines.append)
    assert [s.forgotten for s in result.steps] == [0, 1, 3]
    fractions = [s.zeroed_fraction for s in result.steps]
    assert fractions[0] == 0 and fractions[0] < fractions[1] < fractions[2] <= 1
    assert all(math.isfinite(s.retained_loss) for s in result.steps)
    assert result.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [row["forgotten"] for row in json.loads(result.table.read_text())] == [0, 1, 3]
    assert (run.root / "latest").read_text() == latest and sorted(p.name for p in run.root.iterdir()) == versions
    again = sustainability(run.checkpoint, tmp_path / "sus", sizes=(1, 3), retain_docs=8, say=lines.append)
    assert [s.retained_loss for s in again.steps] == [s.retained_loss for s in result.steps]
    assert any("reusing" in line for line in lines)
    assert capped_sizes((1, 10, 100), 37) == [1, 10, 37]


@contextmanager
def _one_process_megatron():
    """Megatron's model-parallel state in this process, leaving no launcher variables behind (later
    tests launch trainers, which must not join this process's port)."""
    from nulls_megatron.config import ParallelConfig
    from nulls_megatron.process_groups import init_model_parallel

    saved = dict(os.environ)
    try:
        init_model_parallel(ParallelConfig(), seed=1234)
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_dense_active_config_is_a_dense_swiglu(tmp_path):
    from nulls_megatron.model.gpt import build_nulls_gpt
    from nulls_megatron.sinks.reference import dense_weights
    from nulls_megatron.sinks.routing import SinkRouting

    cfg = train_config(tmp_path / "data", tmp_path / "run")  # n_backbone 8, pool 192 in 2 shards, k 12
    dense = dense_active_config(cfg)
    assert (dense.nulls.n_pool, dense.nulls.sinks_per_source, dense.nulls.pool_shards) == (12, 12, 1)
    assert dense.model.ffn_hidden_size == 8 + 12 and dense.seed == cfg.seed and dense.train.data == cfg.train.data
    assert dense.optimizer == cfg.optimizer and dense.train.run_dir == f"{tmp_path / 'run'}-dense-active"
    with _one_process_megatron():
        net = build_nulls_gpt(dense)
    sources = torch.tensor([0, 1, 5, 7, 900_001, 2**31])
    mlps = net.nulls_mlps()
    for mlp in mlps:
        assert torch.equal(mlp.sinks.assignment.sinks_of(sources), torch.arange(12).expand(len(sources), -1))
    # One MLP on its own: every token, whatever its source, runs the same dense SwiGLU of width 20.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 6, 64, generator=gen)  # [s, b, d]
    mlp = mlps[0]
    mlp.routing_context.routing = SinkRouting.train(sources.repeat(5))
    with torch.no_grad():
        y, _ = mlp(x)
        w1, w3, w2 = dense_weights(mlp.linear_fc1.weight, mlp.linear_fc2.weight, mlp.sinks.weight)
        plain = (torch.nn.functional.silu(x @ w1.t()) * (x @ w3.t())) @ w2.t()
    mlp.routing_context.routing = None
    torch.testing.assert_close(y, plain, atol=1e-5, rtol=1e-5)
    # The whole model: own mode gives the same logits for any sources, and equals expected mode (p_mem = 1).
    tokens = torch.randint(0, 256, (2, 16), generator=gen)
    one_doc = torch.zeros_like(tokens)
    with torch.no_grad():
        a = net(tokens, source_ids=one_doc + 3, document_ids=one_doc)
        b = net(tokens, source_ids=torch.randint(0, 10**6, (2, 16), generator=gen), document_ids=one_doc)
        expected = net(tokens, source_ids=one_doc, sink_mode="expected")
        backbone = net(tokens, source_ids=one_doc, sink_mode="backbone")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a, backbone, atol=1e-3)  # the k rows do work

"""The Megatron DDP engine: DP=2 equals DP=1 on the same global batch, tied embeddings stay tied across
pipeline stages, clipping by the global norm, and the learning-rate schedule.

One 2-process launch holds two runs from the same initial weights on the same global batch
(micro-batches b0 and b1):
- DP=2 (PP=1): rank r trains on b_r alone;
- PP=2 (DP=1): both micro-batches through the 1F1B schedule, tied embeddings split over two stages
  (PP=2 equals PP=1 exactly: tests/test_pipeline_parallel.py), so it is the DP=1 reference;
and, independent of Megatron's engine, the plain-torch reference of tests/plain_reference.py (one
process, torch AdamW, clipping written out) on both micro-batches.
"""
from __future__ import annotations

import math

import pytest
import torch

from launch.local import run_local
from nulls_megatron.config import ConfigError, OptimizerConfig
from nulls_megatron.train.lr_schedule import learning_rate
from nulls_megatron.train.packing import PackedRows
from tests.nulls_gpt_helpers import global_param_name, packed_micro_batches, tiny_config

STEPS = 3


def _run(cfg, initial: dict, batches: list[PackedRows]) -> dict:
    from megatron.core import parallel_state

    from nulls_megatron.model.gpt import build_nulls_gpt
    from nulls_megatron.train.engines.megatron_ddp import MegatronDDPEngine

    model = build_nulls_gpt(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # The last stage's tied output weight starts as the embedding, as Megatron syncs it.
            source = "embedding.word_embeddings.weight" if name == "output_layer.weight" and cfg.model.tie_embeddings else name
            p.copy_(initial[global_param_name(model, source)])
    engine = MegatronDDPEngine(model, cfg)
    before = engine.eval_loss(batches)
    losses, norms, exp_avg_norms = [], [], []
    for step in range(STEPS):
        loss, norm = engine.train_step(batches, lr=learning_rate(step, STEPS, cfg.optimizer))
        losses.append(loss)
        norms.append(norm)
        exp_avg_norms.append(math.sqrt(sum(float(engine.moments(p)["exp_avg"].double().pow(2).sum())
                                           for p in model.parameters())))
    params = {global_param_name(model, n): p.detach().clone() for n, p in model.named_parameters()}
    moments = {global_param_name(model, n): engine.moments(p)["exp_avg_sq"] for n, p in model.named_parameters()}
    return {"before": before, "losses": losses, "norms": norms, "exp_avg_norms": exp_avg_norms, "params": params,
            "moments": moments, "steps": engine.optimizer_steps(),
            "first": parallel_state.is_pipeline_first_stage(), "last": parallel_state.is_pipeline_last_stage()}


def _config(pipeline_parallel: int = 1):
    cfg = tiny_config(pipeline_parallel=pipeline_parallel, tie_embeddings=True)
    # A clip threshold below the natural norm, so every step is clipped and clipping is tested too.
    cfg.optimizer.clip_grad, cfg.optimizer.lr, cfg.optimizer.warmup_steps = 0.5, 1e-2, 1
    return cfg


def dp_pp_worker(rank: int, world_size: int) -> dict:
    from nulls_megatron.config import ParallelConfig
    from nulls_megatron.model.gpt import build_nulls_gpt
    from nulls_megatron.process_groups import init_model_parallel

    b = packed_micro_batches(1)
    init_model_parallel(ParallelConfig(pipeline_parallel=1), 1234)  # DP=2: identical weights on both ranks
    initial = {n: p.detach().clone() for n, p in build_nulls_gpt(_config()).named_parameters()}
    data_parallel = _run(_config(), initial, [b[rank]])
    # The plain-torch reference, no engine: both micro-batches in one process (no collective runs in it).
    from tests.plain_reference import plain_adamw_steps

    plain_model = build_nulls_gpt(_config())
    with torch.no_grad():
        for name, p in plain_model.named_parameters():
            p.copy_(initial[name])
    cfg = _config()
    plain = plain_adamw_steps(plain_model, b, STEPS, lambda step: learning_rate(step, STEPS, cfg.optimizer),
                              cfg.optimizer, cfg.optimizer.clip_grad)
    init_model_parallel(ParallelConfig(pipeline_parallel=2), 1234)  # PP=2, DP=1: both micro-batches
    pipeline = _run(_config(pipeline_parallel=2), initial, b)
    return {"dp": data_parallel, "pp": pipeline, "plain": plain}


def test_data_parallel_2_equals_pipeline_parallel_with_tied_embeddings():
    first, last = run_local(dp_pp_worker, 2, timeout=300)
    pp_first, pp_last = first["pp"], last["pp"]
    assert pp_first["first"] and not pp_first["last"] and pp_last["last"]
    dp = first["dp"]
    assert dp["losses"] == last["dp"]["losses"], "DP replicas report the global batch's loss"
    assert pp_first["losses"] == [None] * STEPS
    for step in range(STEPS):
        assert abs(dp["losses"][step] - pp_last["losses"][step]) < 1e-5, (dp["losses"], pp_last["losses"])
        assert math.isclose(dp["norms"][step], pp_last["norms"][step], rel_tol=1e-5), (dp["norms"], pp_last["norms"])
        assert pp_first["norms"][step] == pp_last["norms"][step], "the grad norm is global: equal on every stage"
    assert dp["losses"][0] > dp["losses"][-1]
    assert abs(dp["before"] - dp["losses"][0]) < 1e-6 and abs(pp_last["before"] - dp["losses"][0]) < 1e-5, \
        "eval_loss (no gradients) is the loss the first step trains on"
    assert pp_first["before"] is None
    assert min(dp["norms"]) > 0.5, "the threshold must be below the norm for clipping to be exercised"
    for name, value in dp["params"].items():
        other = last["dp"]["params"][name]
        assert torch.equal(value, other), f"DP replicas diverged on {name}"
        staged = pp_first["params"].get(name, pp_last["params"].get(name))
        assert torch.allclose(value, staged, atol=2e-5, rtol=0), f"DP=2 vs PP=2 (DP=1) differ on {name}"
    # Tied embeddings: the last stage's output weight got the same gradient and update as the embedding.
    assert torch.equal(pp_first["params"]["embedding.word_embeddings.weight"], pp_last["params"]["output_layer.weight"])
    assert pp_first["steps"] == dp["steps"] == STEPS
    # Against the independent plain-torch reference: losses, norms, weights.
    plain = first["plain"]
    for step in range(STEPS):
        assert abs(dp["losses"][step] - plain["losses"][step]) < 1e-5, (dp["losses"], plain["losses"])
        assert math.isclose(dp["norms"][step], plain["norms"][step], rel_tol=1e-5), (dp["norms"], plain["norms"])
    for name, value in dp["params"].items():
        assert torch.allclose(value, plain["params"][name], atol=2e-5, rtol=0), f"DP=2 vs plain torch differ on {name}"
    # Clipping scaled what AdamW stepped with: after step 1 its first moment is (1 - beta1) x the clipped
    # gradient, whose norm is the threshold (the unclipped one's would be 2-5x larger).
    clip, beta1 = _config().optimizer.clip_grad, _config().optimizer.beta1
    assert dp["exp_avg_norms"][0] == pytest.approx((1 - beta1) * clip, rel=1e-4), dp["exp_avg_norms"]
    assert plain["exp_avg_norms"][0] == pytest.approx((1 - beta1) * clip, rel=1e-4)
    moved = dp["moments"]["decoder.layers.0.mlp.sinks.weight"]
    assert moved.abs().sum() > 0 and torch.allclose(moved, pp_first["moments"]["decoder.layers.0.mlp.sinks.weight"], rtol=1e-4, atol=1e-12)


def test_learning_rate_schedule():
    opt = OptimizerConfig(lr=1.0, min_lr=0.1, warmup_steps=4)
    lrs = [learning_rate(s, 20, opt) for s in range(25)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:20], lrs[4:20])), "cosine decays monotonically"
    assert math.isclose(lrs[19], 0.1) and lrs[24] == pytest.approx(0.1), "min_lr at the last step and after"
    assert math.isclose(learning_rate(11, 20, opt), 0.1 + 0.45 * (1 + math.cos(math.pi * 7 / 15)))
    assert learning_rate(0, 1, OptimizerConfig(lr=2.0, warmup_steps=0)) == 2.0
    with pytest.raises(ValueError):
        learning_rate(-1, 10, opt)


def test_global_batch_must_split_over_data_parallel_ranks():
    from nulls_megatron.train.trainer import micro_batches_per_step

    cfg = tiny_config()
    cfg.train.micro_batch_rows, cfg.train.global_batch_rows = 2, 6
    assert micro_batches_per_step(cfg, 1) == 3
    with pytest.raises(ConfigError, match=r"global_batch_rows \(6\).*2 x 2"):
        micro_batches_per_step(cfg, 2)

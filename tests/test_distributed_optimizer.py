"""Megatron's distributed optimizer (``optimizer.distributed``, the GPU default), run on gloo.

One 2-process launch, from the same initial weights and micro-batches:
- DP=2: the distributed optimizer (overlapped gradient reduce-scatter and parameter all-gather, as on
  GPUs, and synchronous) against the replicated engine every CPU run uses: losses, grad norms (before
  Megatron's clipping, which every step exercises), weights and AdamW moments;
- overlapped parameter gather: after a step the parameters outside a rank's shard are stale until
  ``sync_params`` (what a checkpoint save calls), then equal to the synchronous run's bit for bit;
- resume: moments gathered from the shards and loaded into a fresh engine continue bit-exactly, and
  the replicated engine's moments load into the distributed one (checkpoints are interchangeable);
- bf16 (the GPU precision): the fp32 master shards survive the moments round trip;
- TP=2: Megatron's norm over tensor-parallel shards, with the sink tables, equals ours;
- a NaN gradient stops the step on every rank with ``NonFiniteError`` naming the parameter, and the
  weights are untouched (Megatron's ``check_for_nan_in_grad``, before the reduce-scatter).
"""
from __future__ import annotations

import math

import torch

from launch.local import run_local
from tests.nulls_gpt_helpers import global_param_name, packed_micro_batches, tiny_config

STEPS = 3
CLIP = 0.5  # below the natural norm: every step is clipped


def _config(tensor_parallel: int = 1):
    cfg = tiny_config(tensor_parallel=tensor_parallel)
    cfg.optimizer.clip_grad, cfg.optimizer.lr, cfg.optimizer.warmup_steps = CLIP, 1e-2, 1
    cfg.optimizer.distributed = "on"
    return cfg


def _build(cfg, initial: dict, kind: str, bf16: bool = False):
    from nulls_megatron.model.gpt import build_nulls_gpt
    from nulls_megatron.train.engines.megatron_ddp import MegatronDDPEngine
    from nulls_megatron.train.engines.megatron_distributed_optimizer import MegatronDistributedOptimizerEngine
    from nulls_megatron.train.precision import bf16_model_overrides

    model = build_nulls_gpt(cfg, **(bf16_model_overrides() if bf16 else {}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(initial[global_param_name(model, name)])
    if kind == "replicated":
        return MegatronDDPEngine(model, cfg, bf16=bf16)
    return MegatronDistributedOptimizerEngine(model, cfg, bf16=bf16, overlap=kind == "overlapped")


def _lr(step: int) -> float:
    from nulls_megatron.train.lr_schedule import learning_rate

    return learning_rate(step, STEPS, _config().optimizer)


def _train(engine, batches, steps: range) -> tuple[list, list]:
    losses, norms = [], []
    for step in steps:
        loss, norm = engine.train_step(batches, lr=_lr(step))
        losses.append(loss)
        norms.append(norm)
    return losses, norms


def _params(engine) -> dict:
    model = engine.module
    return {global_param_name(model, n): p.detach().float().clone() for n, p in model.named_parameters()}


def _moments(engine) -> dict:
    model = engine.module
    return {global_param_name(model, n): engine.moments(p) for n, p in model.named_parameters()}


def _load(engine, moments: dict, steps: int) -> None:
    model = engine.module
    engine.load_moments([(p, moments[global_param_name(model, n)]) for n, p in model.named_parameters()], steps)


def _initial(cfg) -> dict:
    from nulls_megatron.model.gpt import build_nulls_gpt

    model = build_nulls_gpt(cfg)
    return {global_param_name(model, n): p.detach().clone() for n, p in model.named_parameters()}


def worker(rank: int, world_size: int) -> dict:
    from nulls_megatron.config import ParallelConfig
    from nulls_megatron.process_groups import init_model_parallel
    from nulls_megatron.train.grad_norm import NonFiniteError

    b = packed_micro_batches(1)
    out: dict = {}
    init_model_parallel(ParallelConfig(), 1234)  # DP=2
    cfg = _config()
    initial = _initial(cfg)
    mine = [b[rank]]

    replicated = _build(cfg, initial, "replicated")
    out["replicated"] = _train(replicated, mine, range(STEPS))
    out["replicated_params"], out["replicated_moments"] = _params(replicated), _moments(replicated)
    # Both engines keep Megatron's main_grad buffers: the sink kernel added the rows' gradients into them.
    out["sinks_into_main_grad"] = [m.sinks.weight.grad_added_to_main_grad for m in replicated.module.nulls_mlps()]

    synchronous = _build(cfg, initial, "synchronous")
    first = _train(synchronous, mine, range(2))
    params2, moments2 = _params(synchronous), _moments(synchronous)
    last = _train(synchronous, mine, range(2, STEPS))
    out["synchronous"] = (first[0] + last[0], first[1] + last[1])
    out["synchronous_params"], out["synchronous_moments"] = _params(synchronous), _moments(synchronous)
    out["sinks_into_main_grad"] += [m.sinks.weight.grad_added_to_main_grad for m in synchronous.module.nulls_mlps()]

    overlapped = _build(cfg, initial, "overlapped")
    out["overlapped"] = _train(overlapped, mine, range(STEPS))
    out["overlapped_stale"] = _params(overlapped)  # before the deferred all-gather
    overlapped.sync_params()
    out["overlapped_params"] = _params(overlapped)
    out["overlapped_after_sync"] = _train(overlapped, mine, range(STEPS, STEPS + 1))  # training goes on after a save

    resumed = _build(cfg, params2, "overlapped")
    _load(resumed, moments2, steps=2)
    out["resumed"] = _train(resumed, mine, range(2, STEPS))
    resumed.sync_params()
    out["resumed_params"] = _params(resumed)
    # The replicated engine's checkpoint state into the distributed optimizer, and back out.
    crossed = _build(cfg, out["replicated_params"], "overlapped")
    _load(crossed, out["replicated_moments"], steps=STEPS)
    out["crossed_moments"] = _moments(crossed)

    # bf16: the moments and fp32 master shards round-trip, and training continues from them bit-exactly.
    bf = _build(cfg, initial, "overlapped", bf16=True)
    _train(bf, mine, range(2))
    bf_params, bf_moments = _params(bf), _moments(bf)
    out["bf16_next"] = _train(bf, mine, range(2, STEPS))
    bf.sync_params()
    out["bf16_params"] = _params(bf)
    bf_resumed = _build(cfg, bf_params, "overlapped", bf16=True)
    _load(bf_resumed, bf_moments, steps=2)
    out["bf16_resumed_next"] = _train(bf_resumed, mine, range(2, STEPS))
    bf_resumed.sync_params()
    out["bf16_resumed_params"] = _params(bf_resumed)
    out["bf16_master_is_fp32"] = all(m["main_param"].dtype == torch.float32 for m in bf_moments.values())

    # A NaN in one parameter's gradient on both ranks (a hook on it): the step must not be taken.
    poisoned = _build(cfg, initial, "overlapped")
    poisoned.module.decoder.layers[1].mlp.linear_fc1.weight.register_hook(lambda grad: grad * float("nan"))
    before = _params(poisoned)
    try:
        _train(poisoned, mine, range(1))
        out["nan"] = None
    except NonFiniteError as e:
        out["nan"] = str(e)
    after = _params(poisoned)
    out["nan_untouched"] = all(torch.equal(before[k], after[k]) for k in before)

    init_model_parallel(ParallelConfig(tensor_parallel=2), 1234)  # TP=2, DP=1: both micro-batches
    cfg = _config(tensor_parallel=2)
    initial = _initial(cfg)
    out["tp_replicated"] = _train(_build(cfg, initial, "replicated"), b, range(STEPS))
    tp = _build(cfg, initial, "overlapped")
    out["tp_distributed"] = _train(tp, b, range(STEPS))
    return out


def _close(a: dict, b: dict, atol: float) -> list[str]:
    return [k for k in a if not torch.allclose(a[k], b[k], atol=atol, rtol=0)]


def test_distributed_optimizer_on_gloo():
    r0, r1 = run_local(worker, 2, timeout=600)
    rep_losses, rep_norms = r0["replicated"]
    for name in ("synchronous", "overlapped"):
        losses, norms = r0[name]
        assert all(abs(a - b) < 1e-6 for a, b in zip(losses, rep_losses)), (name, losses, rep_losses)
        assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(norms, rep_norms)), (name, norms, rep_norms)
        assert r1[name][1] == norms, "the grad norm is global: the same on every rank"
    assert min(rep_norms) > CLIP, "every step must be clipped for clipping to be tested"
    assert r0["sinks_into_main_grad"] == [True] * 4, "the sink tables' gradients went straight into main_grad"
    assert not _close(r0["synchronous_params"], r0["replicated_params"], 2e-6)
    for key, m in r0["synchronous_moments"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            ref = r0["replicated_moments"][key][name]  # the clip factors differ in the last bits: relative to the scale
            assert torch.allclose(m[name], ref, rtol=0, atol=1e-4 * float(ref.abs().max())), (key, name)
            assert torch.equal(m[name], r1["synchronous_moments"][key][name]), "moments are gathered whole on every rank"
    # Overlapped parameter gather: stale until synced, then the synchronous run's weights exactly.
    assert r0["overlapped"] == r0["synchronous"]
    stale = [k for k in r0["overlapped_params"] if not torch.equal(r0["overlapped_stale"][k], r0["overlapped_params"][k])]
    assert stale, "without sync_params some parameters must still be last step's (else the test proves nothing)"
    for r in (r0, r1):
        assert all(torch.equal(r["overlapped_params"][k], r0["synchronous_params"][k]) for k in r0["synchronous_params"])
    assert r0["overlapped_after_sync"][0][0] < r0["overlapped"][0][0]
    # Resume from gathered moments: bit-exact.
    assert r0["resumed"] == ([r0["synchronous"][0][2]], [r0["synchronous"][1][2]])
    assert all(torch.equal(r0["resumed_params"][k], r0["synchronous_params"][k]) for k in r0["synchronous_params"])
    for key, m in r0["crossed_moments"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(m[name], r0["replicated_moments"][key][name]), (key, name)
    # bf16: master shards and moments round-trip exactly.
    assert r0["bf16_master_is_fp32"]
    assert r0["bf16_resumed_next"] == r0["bf16_next"]
    assert all(torch.equal(r0["bf16_resumed_params"][k], r0["bf16_params"][k]) for k in r0["bf16_params"])
    # NaN: refused on every rank, naming a parameter, before any weight changed.
    for r in (r0, r1):
        assert r["nan"] is not None and "first non-finite gradient: decoder.layers.1.mlp.linear_fc1.weight " in r["nan"], r["nan"]
        assert "step was not taken" in r["nan"] and r["nan_untouched"]
    # TP=2: Megatron's norm and update over tensor-parallel shards equal the replicated engine's.
    for r in (r0, r1):
        (tl, tn), (dl, dn) = r["tp_replicated"], r["tp_distributed"]
        assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(tn, dn)), (tn, dn)
        assert all(a is None and b is None or abs(a - b) < 1e-5 for a, b in zip(tl, dl)), (tl, dl)


def test_auto_means_the_distributed_optimizer_with_cuda_only(monkeypatch):
    from nulls_megatron.config import EngineName
    from nulls_megatron.train.trainer import use_distributed_optimizer

    cfg = tiny_config()
    for cuda, mode, engine, expected in [(True, "auto", EngineName.MEGATRON, True), (False, "auto", EngineName.MEGATRON, False),
                                         (True, "off", EngineName.MEGATRON, False), (False, "on", EngineName.MEGATRON, True),
                                         (True, "auto", EngineName.DEEPSPEED, False)]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        cfg.optimizer.distributed, cfg.train.engine = mode, engine
        assert use_distributed_optimizer(cfg) is expected, (cuda, mode, engine)

"""The sink pool sharded over expert-parallel ranks inside the model, trained by every engine (Megatron
DDP, Megatron's distributed optimizer, DeepSpeed ZeRO-1/2), against the whole table on every rank; and
its checkpoint files loaded at other expert-parallel sizes.

One 4-process gloo launch (TP = PP = 1, so DP = 4; every rank trains its own micro-batch of one
global batch):
- EP=1 (every rank holds the whole table) and EP=2 (each rank half of it, two expert-data-parallel
  replicas): the same initial weights, then losses, grad norms, every weight and the sink tables'
  AdamW moments after 3 steps match, and the EP=2 shards are the EP=1 table's rows;
- the same with Megatron's distributed optimizer, and with full activation recompute (the dispatch
  runs again in the backward), at EP=2;
- TP=2 (DP = 2) and PP=2 (DP = 2), each with EP=1 and with EP=2: losses, norms and sink tables match;
- DeepSpeed ZeRO-1 and ZeRO-2 at EP=2 against their own EP=1, and TP=2 x EP=2 under ZeRO-1 against
  TP=2: the same checks as the first (the pool's optimizer state partitioned over the
  expert-data-parallel group);
- the EP=2 checkpoint files (each expert-parallel rank writes its pool shards, rank 0 the manifest)
  load into whole tables (EP=1) and into EP=4 shards, and a checkpoint of whole tables loads into
  EP=2 and EP=4 shards: weights, disabled flags and optimizer moments row for row.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from launch.local import run_local
from nulls_megatron.config import ConfigError
from tests.nulls_gpt_helpers import packed_micro_batches, tiny_config

STEPS = 3


def _config(tensor_parallel: int, expert_parallel: int, pipeline_parallel: int = 1, recompute: str = "none",
            engine: str = "megatron"):
    cfg = tiny_config(tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel)
    cfg.train.engine = type(cfg.train.engine)(engine)
    cfg.model.recompute = recompute
    cfg.nulls.pool_shards = 4  # EP = 4 divides it: 48 rows per shard, k = 12
    cfg.parallel.expert_parallel = expert_parallel
    cfg.optimizer.clip_grad, cfg.optimizer.lr, cfg.optimizer.warmup_steps = 0.5, 1e-2, 1
    return cfg


class _Rows:
    """Per-row tensors of a sink table (its moments, its flags), gathered as the table is."""

    def __init__(self, weight: torch.Tensor, dispatcher) -> None:
        self.weight, self.dispatcher = weight, dispatcher


def _full_table(table, group) -> torch.Tensor:
    """The whole pool of a (possibly expert-parallel) sink table, on every rank of its group."""
    import torch.distributed as dist

    if table.dispatcher is None:
        return table.weight.detach().clone()
    parts = [torch.empty_like(table.weight) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, table.weight.detach().contiguous(), group=group)
    return torch.cat(parts)


def _train(cfg, batches: list, distributed_optimizer: bool = False) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from nulls_megatron.model.gpt import build_nulls_gpt
    from nulls_megatron.process_groups import init_model_parallel
    from nulls_megatron.train.engines.megatron_ddp import MegatronDDPEngine
    from nulls_megatron.train.lr_schedule import learning_rate

    init_model_parallel(cfg.parallel, 1234)
    model = build_nulls_gpt(cfg)
    group = parallel_state.get_expert_model_parallel_group() if cfg.parallel.expert_parallel > 1 else None
    tables = [m.sinks for m in model.nulls_mlps()]
    initial = [_full_table(t, group) for t in tables]
    if cfg.train.engine.value == "deepspeed":
        from nulls_megatron.train.engines.deepspeed_zero import DeepSpeedZeroEngine

        engine = DeepSpeedZeroEngine(model, cfg, num_micro_batches=1)
    elif distributed_optimizer:
        from nulls_megatron.train.engines.megatron_distributed_optimizer import MegatronDistributedOptimizerEngine

        engine = MegatronDistributedOptimizerEngine(model, cfg)
    else:
        engine = MegatronDDPEngine(model, cfg)
    batch = batches[parallel_state.get_data_parallel_rank()]
    losses, norms = [], []
    for step in range(STEPS):
        loss, norm = engine.train_step([batch], lr=learning_rate(step, STEPS, cfg.optimizer))
        losses.append(loss)
        norms.append(norm)
    engine.sync_params()
    backbone = {n: p.detach().clone() for n, p in model.named_parameters() if "sinks" not in n}
    full_moments = [_full_table(_Rows(engine.moments(t.weight)["exp_avg"], t.dispatcher), group) for t in tables]
    result = {"losses": losses, "norms": norms, "initial": initial, "tables": [_full_table(t, group) for t in tables],
              "moments": full_moments, "backbone": backbone, "rows": [(t.row_start, t.row_stop) for t in tables],
              "expert_dp_rank": parallel_state.get_expert_data_parallel_rank()}
    dist.barrier()
    return result, model, engine


def _checkpoint_checks(model, engine, out: Path) -> dict:
    """Save the EP=2 model's sink files the way the trainer does and load them at EP=1 and EP=4;
    save whole tables and load them at EP=2 and EP=4."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from nulls_megatron.checkpoint.sinks import (SourceState, load_sink_tables, table_key, write_sink_files,
                                                 write_sink_manifest)
    from nulls_megatron.sinks.assignment import assignment_from_config
    from nulls_megatron.sinks.table import SinkTable

    rank = dist.get_rank()
    cfg = model.cfg
    assignment = assignment_from_config(cfg.nulls)
    tables = [m.sinks for m in model.nulls_mlps()]
    for t in tables:  # some forgotten rows, so that the flags travel too
        t.disabled[:3] = True  # rows 0-2 and 96-98 of the pool
    state = {table_key(t): engine.moments(t.weight) for t in tables}
    ep_group = parallel_state.get_expert_model_parallel_group()
    want = [_full_table(t, ep_group) for t in tables]
    want_disabled = [_full_table(_Rows(t.disabled.to(torch.uint8), t.dispatcher), ep_group).bool() for t in tables]
    want_moments = [_full_table(_Rows(state[table_key(t)]["exp_avg"], t.dispatcher), ep_group) for t in tables]

    def save(tables, optimizer_state, folder: Path, writes: bool) -> None:
        part = write_sink_files(folder, tables, optimizer_state) if writes else None
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, part)
        if rank == 0:
            write_sink_manifest(folder, [p for p in parts if p is not None], SourceState())
        dist.barrier()

    def loaded(group) -> tuple[list, list]:
        fresh = [SinkTable(assignment, cfg.model.hidden_size, cfg.nulls.n_backbone, layer_number=t.layer_number,
                           expert_group=group) for t in tables]
        optim = load_sink_tables(folder, fresh)
        return fresh, optim

    def matches(fresh, optim) -> bool:
        ok = True
        for t, w, d, m in zip(fresh, want, want_disabled, want_moments):
            rows = slice(t.row_start, t.row_stop)
            ok &= torch.equal(t.weight.detach(), w[rows]) and torch.equal(t.disabled, d[rows])
            ok &= torch.equal(optim[table_key(t)]["exp_avg"], m[rows])
        return bool(ok)

    ep4 = dist.new_group(list(range(4)))
    ep2 = [dist.new_group([0, 1]), dist.new_group([2, 3])][rank // 2]
    out_checks = {}
    folder = out / "saved_at_ep2"
    save(tables, state, folder, writes=parallel_state.get_expert_data_parallel_rank() == 0)
    out_checks["ep2 -> ep1"] = matches(*loaded(None))
    out_checks["ep2 -> ep4"] = matches(*loaded(ep4))
    out_checks["ep4 shards"] = [(t.row_start, t.row_stop) for t in loaded(ep4)[0]][0] == (48 * rank, 48 * (rank + 1))
    whole, whole_optim = loaded(None)
    folder = out / "saved_at_ep1"
    save(whole, whole_optim, folder, writes=rank == 0)
    out_checks["ep1 -> ep2"] = matches(*loaded(ep2))
    out_checks["ep1 -> ep4"] = matches(*loaded(ep4))
    return out_checks


def expert_parallel_worker(rank: int, world_size: int, out: str) -> dict:
    batches = packed_micro_batches(0) + packed_micro_batches(1)
    ep1, _, _ = _train(_config(1, 1), batches)
    ep2, model, engine = _train(_config(1, 2), batches)
    checks = _checkpoint_checks(model, engine, Path(out))
    ep2_distributed, _, _ = _train(_config(1, 2), batches, distributed_optimizer=True)
    ep2_recompute, _, _ = _train(_config(1, 2, recompute="full"), batches)
    runs = {"ep1": ep1, "ep2": ep2, "ep2_distributed": ep2_distributed, "ep2_recompute": ep2_recompute,
            "checkpoint": checks}
    for name, tp, pp in (("tp2", 2, 1), ("pp2", 1, 2)):  # DP = 2: EP = 2 spans both replicas
        runs[f"{name}_ep1"], _, _ = _train(_config(tp, 1, pipeline_parallel=pp), batches)
        runs[f"{name}_ep2"], _, _ = _train(_config(tp, 2, pipeline_parallel=pp), batches)
    for zero_stage in (1, 2):  # DeepSpeed ZeRO: EP=2 (DP = 4) against its own EP=1
        for ep in (1, 2):
            cfg = _config(1, ep, engine="deepspeed")
            cfg.train.zero_stage = zero_stage
            runs[f"deepspeed_zero{zero_stage}_ep{ep}"], _, _ = _train(cfg, batches)
    runs["deepspeed_tp2_ep1"], _, _ = _train(_config(2, 1, engine="deepspeed"), batches)
    runs["deepspeed_tp2_ep2"], _, _ = _train(_config(2, 2, engine="deepspeed"), batches)
    return runs


def _assert_trains_as(ep1: dict, other: dict, what: str) -> None:
    """``other`` (an expert-parallel run) trained exactly as ``ep1`` (the whole table on every rank)."""
    for a, b in zip(ep1["initial"], other["initial"]):
        assert torch.equal(a, b), f"{what}: the shards start as the rows of the EP=1 table"
    for step in range(STEPS):
        assert abs(ep1["losses"][step] - other["losses"][step]) < 1e-5, (what, ep1["losses"], other["losses"])
        assert math.isclose(ep1["norms"][step], other["norms"][step], rel_tol=1e-5), (what, ep1["norms"], other["norms"])
    for a, b in zip(ep1["tables"], other["tables"]):
        assert torch.allclose(a, b, atol=2e-6, rtol=0), f"{what}: sink tables after {STEPS} steps"
    for a, b in zip(ep1["moments"], other["moments"]):
        assert a.abs().sum() > 0 and torch.allclose(a, b, atol=1e-9, rtol=1e-4), f"{what}: AdamW first moments of the pool"
    for name, value in ep1["backbone"].items():
        assert torch.allclose(value, other["backbone"][name], atol=2e-6, rtol=0), (what, name)


def test_expert_parallel_pool_trains_as_the_whole_table_and_its_checkpoint_loads_at_any_size(tmp_path):
    results = run_local(expert_parallel_worker, 4, str(tmp_path), timeout=600)
    assert [r["ep2"]["rows"][0] for r in results] == [(0, 96), (96, 192), (0, 96), (96, 192)]
    assert [r["ep2"]["expert_dp_rank"] for r in results] == [0, 0, 1, 1]
    for r in results:
        assert r["ep1"]["losses"][-1] < r["ep1"]["losses"][0]
        assert all((a - b).abs().sum() > 0 for a, b in zip(r["ep1"]["tables"], r["ep1"]["initial"])), "sinks trained"
        _assert_trains_as(r["ep1"], r["ep2"], "EP=2")
        _assert_trains_as(r["ep1"], r["ep2_distributed"], "EP=2, Megatron's distributed optimizer")
        _assert_trains_as(r["ep1"], r["ep2_recompute"], "EP=2, full recompute (the dispatch runs again in backward)")
        for name in ("tp2", "pp2"):
            ep1, ep2 = r[f"{name}_ep1"], r[f"{name}_ep2"]
            for step in range(STEPS):
                if ep1["losses"][step] is not None:  # the last pipeline stage's
                    assert abs(ep1["losses"][step] - ep2["losses"][step]) < 1e-5, (name, ep1["losses"], ep2["losses"])
                assert math.isclose(ep1["norms"][step], ep2["norms"][step], rel_tol=1e-5), (name, ep1["norms"], ep2["norms"])
            for a, b in zip(ep1["tables"], ep2["tables"]):
                assert torch.allclose(a, b, atol=2e-6, rtol=0), f"{name}: sink tables after {STEPS} steps"
        for zero_stage in (1, 2):
            _assert_trains_as(r[f"deepspeed_zero{zero_stage}_ep1"], r[f"deepspeed_zero{zero_stage}_ep2"],
                              f"EP=2 under DeepSpeed ZeRO-{zero_stage}")
        _assert_trains_as(r["deepspeed_tp2_ep1"], r["deepspeed_tp2_ep2"], "TP=2 x EP=2 under DeepSpeed ZeRO-1")
        assert r["deepspeed_zero1_ep2"]["rows"] == r["ep2"]["rows"], "DeepSpeed trains the same shards"
        assert r["checkpoint"] == {"ep2 -> ep1": True, "ep2 -> ep4": True, "ep4 shards": True,
                                   "ep1 -> ep2": True, "ep1 -> ep4": True}, r["checkpoint"]


def test_expert_parallel_config_is_checked():
    from nulls_megatron.config import config_from_dict

    def with_changes(**sections) -> dict:
        data = _config(1, 1).to_dict()
        for section, values in sections.items():
            data[section].update(values)
        return data

    config_from_dict(with_changes(parallel={"expert_parallel": 4}))
    with pytest.raises(ConfigError, match="parallel.expert_parallel.*3 does not divide nulls.pool_shards"):
        config_from_dict(with_changes(parallel={"expert_parallel": 3}))
    config_from_dict(with_changes(parallel={"expert_parallel": 2}, train={"engine": "deepspeed", "zero_stage": 2}))
    config_from_dict(with_changes(parallel={"expert_parallel": 2}, optimizer={"distributed": "on"}))

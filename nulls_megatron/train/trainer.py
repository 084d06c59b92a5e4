"""`nulls train`: the training loop, the same on 2 CPU processes (gloo) and on a GPU cluster (NCCL).

Three parts: ``build`` (process groups, the resume point, loader, model and engine: a ``Run``),
``train_step`` (every data-parallel replica draws ``global_batch_rows / (micro_batch_rows x DP)``
micro-batches from its slice of the shards, the engine runs forward/backward through the pipeline
schedule, reduces and clips gradients and takes an AdamW step at the scheduled lr) and the loop in
``train`` (progress and MLflow on rank 0, checkpoints every ``save_every`` steps, at the end and on a
stop request). A restarted job continues from ``latest`` with bit-identical results (same data, same
weights, same optimizer state).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ..checkpoint.provenance import describe_sources_manifest
from ..checkpoint.sinks import SourceState, read_sink_manifest, source_state
from ..checkpoint.train_state import finished_message
from ..config import Config, ConfigError, EngineName
from ..model.gpt import build_nulls_gpt, train_routing_plan
from ..process_groups import init_model_parallel
from ..sinks.assignment import Assignment, assignment_from_config
from .checkpointing import load_checkpoint, prepare_checkpoint_root, read_train_state, resume_point, save_checkpoint
from .engines.base import Engine
from .grad_norm import NonFiniteError
from .loader import PackedLoader
from .packing import PackedRows
from .lr_schedule import learning_rate
from .precision import bf16_model_overrides, use_bf16
from .prefetch import PrefetchLoader
from .sink_stats import sink_statistics
from .stop import StopRequest
from .progress import format_progress
from .tracking import Tracker, TrackingSettings, create_tracker

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    steps_run: int  # steps taken by this process (after a resume: since the resume)
    final_step: int
    losses: list[float] = field(default_factory=list)  # per step (the last pipeline stage's, on every rank)
    resumed_from: str | None = None
    run_id: str | None = None
    checkpoint: str | None = None
    stopped_by: str | None = None  # a signal name or the STOP file, when stopped before train.steps
    last_loss: float | None = None  # the last step's loss (also of a run that was already finished)


def _set_cpu_threads() -> None:
    """Processes on one CPU host share its cores: oversubscribed OpenMP threads spin against each
    other (measured here: a tiny step went from 50 ms to 2.2 s with 2 ranks x 2 threads on 2 cores)."""
    if torch.cuda.is_available() or "OMP_NUM_THREADS" in os.environ:
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1")).split("(")[0] or 1)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local, 1)))


def micro_batches_per_step(cfg: Config, dp_world: int) -> int:
    t = cfg.train
    per_step = t.micro_batch_rows * dp_world
    if t.global_batch_rows % per_step:
        raise ConfigError(f"train.global_batch_rows ({t.global_batch_rows}) is not a multiple of "
                          f"train.micro_batch_rows x data-parallel size ({t.micro_batch_rows} x {dp_world})")
    return t.global_batch_rows // per_step


def build_model_and_engine(cfg: Config, num_micro_batches: int) -> Engine:
    """This rank's model and its engine. DeepSpeed casts an fp32-built model to bf16 itself;
    for Megatron the model is built in bf16 and the engine wraps it in Float16Module."""
    bf16 = use_bf16(cfg)
    if cfg.train.engine is EngineName.DEEPSPEED:
        from .engines.deepspeed_zero import DeepSpeedZeroEngine

        return DeepSpeedZeroEngine(build_nulls_gpt(cfg), cfg, num_micro_batches)
    model = build_nulls_gpt(cfg, **(bf16_model_overrides() if bf16 else {}))
    if use_distributed_optimizer(cfg):
        from .engines.megatron_distributed_optimizer import MegatronDistributedOptimizerEngine

        return MegatronDistributedOptimizerEngine(model, cfg, bf16=bf16)
    from .engines.megatron_ddp import MegatronDDPEngine

    return MegatronDDPEngine(model, cfg, bf16=bf16)


def routing_planner(cfg: Config) -> Callable[[PackedRows], PackedRows]:
    """What the loader's thread does to each micro-batch: plan its sink routing (tokens grouped by
    source, each source's rows for every layer salt), so that the forward on the device neither
    sorts, nor hashes with numpy, nor waits for the host (the group offsets travel as Python ints)."""
    assignment = assignment_from_config(cfg.nulls)
    layers = range(cfg.model.num_layers) if cfg.nulls.per_layer_sinks else (0,)
    if cfg.parallel.expert_parallel > 1:
        # The tokens' dispatch is planned in the forward (a collective over the expert-parallel group).
        return lambda batch: batch

    def plan(batch: PackedRows) -> PackedRows:
        return dataclasses.replace(batch, routing=train_routing_plan(batch.source_ids, assignment, layers))

    return plan


def use_distributed_optimizer(cfg: Config) -> bool:
    """``optimizer.distributed`` resolved: auto is on with CUDA (the state of a 1B model is 16 bytes a
    parameter replicated on every rank otherwise) and off on CPU, where the replicated path is the one
    every CPU test of the trainer runs; the distributed one has its own (tests/test_distributed_optimizer.py,
    and with an expert-parallel pool tests/test_expert_parallel.py)."""
    if cfg.train.engine is not EngineName.MEGATRON:
        return False
    return {"on": True, "off": False}.get(cfg.optimizer.distributed, torch.cuda.is_available())


def _pipeline_loss(loss: float | None) -> float:
    """The last stage's loss on every rank (rank 0 logs; with PP it sits on the first stage)."""
    value = torch.tensor([loss if loss is not None else 0.0], dtype=torch.float64)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(value, group=parallel_state.get_pipeline_model_parallel_group())
    return float(value)


def _skipped_forgotten(loader: PrefetchLoader) -> dict[str, float]:
    """Documents and tokens of forgotten sources the loaders dropped so far, summed over data-parallel
    replicas (the ranks of one replica read the same documents). Cumulative over the whole training,
    resumes included: the counters travel in the loader state, up to the batches handed out."""
    state = loader.state_dict()
    count = torch.tensor([state["skipped_documents"], state["skipped_tokens"]], dtype=torch.int64)
    dist.all_reduce(count, group=parallel_state.get_data_parallel_group())
    return {"data/skipped_forgotten_documents": float(count[0]), "data/skipped_forgotten_tokens": float(count[1])}


def _global_tokens(batches) -> int:
    count = torch.tensor([sum(int(b.loss_mask.sum()) for b in batches)], dtype=torch.int64)
    dist.all_reduce(count, group=parallel_state.get_data_parallel_group())
    return int(count)


MAX_ARTIFACT_BYTES = 64 << 20  # the 6M-article manifest (~hundreds of MB) is referenced, not copied


def _artifacts(cfg: Config, config_path: str | None) -> list[Path]:
    data = Path(cfg.train.data)
    candidates = [Path(config_path)] if config_path else []
    candidates += [data / "prep_report.json", data / "shard_index.json", data / "manifest.parquet"]
    return [p for p in candidates if p.is_file() and p.stat().st_size <= MAX_ARTIFACT_BYTES]


def _check_finite(step: int, loss: float, grad_norm: float) -> None:
    # Every rank holds the same (pipeline-reduced) loss and global norm, so all ranks stop together.
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise NonFiniteError(f"step {step}: loss {loss}, gradient norm {grad_norm} (rank {dist.get_rank()}); stopped "
                             "before saving: the checkpoints on disk are the last good state")


def _finished(resumed: Path, state: dict, total: int, rank: int) -> TrainResult:
    loss = state.get("loss")
    if rank == 0:
        print(finished_message(resumed, state, total), flush=True)
    return TrainResult(steps_run=0, final_step=int(state["step"]), losses=[], resumed_from=str(resumed),
                       checkpoint=str(resumed), last_loss=loss)


@dataclass
class Run:
    """What every step of this process uses, built once by :func:`build`."""

    cfg: Config
    engine: Engine
    loader: PrefetchLoader
    assignment: Assignment
    micro_batches: int
    start: int  # the step the run resumes after (0: from scratch)
    tokens: int  # loss tokens seen over all data-parallel replicas so far
    sources: SourceState  # the sink manifest's state, saved with every checkpoint
    off: list[int]  # forgotten or excluded sources: their documents are never fed
    resumed: Path | None


@dataclass
class StepOutput:
    step: int  # the step just completed (1-based)
    loss: float  # the last pipeline stage's loss, on every rank
    grad_norm: float
    lr: float
    tokens: int  # loss tokens of this step over all data-parallel replicas
    batches: list


def build(cfg: Config, resumed: Path | None) -> Run:
    """The loader, model and engine of this rank, restored from ``resumed`` when given."""
    dp_rank, dp_world = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    n_micro = micro_batches_per_step(cfg, dp_world)
    # The forgotten sources of `latest` (erased or suppressed) are known before the loader exists:
    # training after unlearning must not feed their documents again, and the prefetch thread must not
    # pack one even a batch ahead.
    off = source_state(read_sink_manifest(resumed)).off_sources() if resumed is not None else []
    off = sorted(set(off) | set(cfg.train.exclude_sources))
    loader = PrefetchLoader(PackedLoader(
        cfg.train.data, cfg.model.seq_length, cfg.train.micro_batch_rows, vocab_size=cfg.model.vocab_size,
        seed=cfg.seed, dp_rank=dp_rank, dp_world=dp_world, verify=cfg.train.verify_shards,
        max_document_tokens=cfg.train.max_document_tokens, skip_sources=off), depth=2 * n_micro,
        prepare=routing_planner(cfg))
    try:  # the prefetch thread is running: a refusal below must not leave it reading shards
        engine = build_model_and_engine(cfg, n_micro)
        run = Run(cfg, engine, loader, assignment_from_config(cfg.nulls), n_micro, start=0, tokens=0,
                  sources=SourceState(), off=off, resumed=resumed)
        prepare_checkpoint_root(cfg)
        if resumed is not None:
            state, run.sources = load_checkpoint(resumed, engine, loader)
            run.start, run.tokens = int(state["step"]), int(state["tokens"])
            if run.sources.off_sources() != off:
                raise RuntimeError(f"{resumed}: the sink manifest changed while it was loaded (off sources "
                                   f"{off[:5]}... then {run.sources.off_sources()[:5]}...)")
            if dist.get_rank() == 0:
                print(f"resuming from {resumed} (step {run.start})", flush=True)
                if off:
                    print(f"{len(off)} sources are off in {resumed.name} ({len(run.sources.disabled_sources)} erased, "
                          f"{len(run.sources.suppressed_sources)} suppressed): their documents will be skipped", flush=True)
        if run.sources.sources_manifest is None:  # which titles the source indices stand for, for `nulls unlearn`
            run.sources.sources_manifest = describe_sources_manifest(cfg.train.data) if dist.get_rank() == 0 else None
    except BaseException:
        loader.close()
        raise
    return run


def train_step(run: Run, step: int) -> StepOutput:
    """Step ``step + 1``: draw the micro-batches, forward/backward, reduce, clip, update. Stops with
    NonFiniteError before the update (and so before any save) when the loss or gradients are not finite."""
    batches = [next(run.loader) for _ in range(run.micro_batches)]
    lr = learning_rate(step, run.cfg.train.steps, run.cfg.optimizer)
    try:
        loss, grad_norm = run.engine.train_step(batches, lr)
    except NonFiniteError as e:
        raise NonFiniteError(f"step {step + 1}: {e}; stopped before saving: the checkpoints on disk are "
                             "the last good state") from None
    tokens = _global_tokens(batches)
    run.tokens += tokens
    loss = _pipeline_loss(loss)
    _check_finite(step + 1, loss, grad_norm)
    return StepOutput(step + 1, loss, grad_norm, lr, tokens, batches)


class _Throughput:
    """Tokens per second of training since the last report, with checkpoint saves left out."""

    def __init__(self) -> None:
        self.began = self.window_start = time.perf_counter()
        self.window_tokens = 0

    def add(self, tokens: int) -> None:
        self.window_tokens += tokens

    def report(self) -> tuple[float, float]:
        """(tokens/s of the window, seconds since the run began); starts a new window."""
        now = time.perf_counter()
        rate = self.window_tokens / max(now - self.window_start, 1e-9)
        self.window_start, self.window_tokens = now, 0
        return rate, now - self.began

    def leave_out(self, seconds: float) -> None:
        self.window_start += seconds


def _log_step(run: Run, out: StepOutput, tracker: Tracker, meter: _Throughput) -> None:
    rate, elapsed = meter.report()
    metrics = {"loss": out.loss, "lr": out.lr, "grad_norm": out.grad_norm, "tokens_per_s": rate, "tokens": run.tokens}
    metrics.update(sink_statistics(out.batches, run.assignment, parallel_state.get_data_parallel_group()))
    if run.off:  # only runs that continue after unlearning have these
        metrics.update(_skipped_forgotten(run.loader))
    tracker.log_step(out.step, metrics)
    if dist.get_rank() == 0:
        print(format_progress(out.step, run.cfg.train.steps, out.loss, rate, elapsed, start_step=run.start), flush=True)


def _save(run: Run, out: StepOutput, meter: _Throughput) -> str:
    saving = time.perf_counter()
    path = str(save_checkpoint(run.cfg, out.step, run.engine, run.loader, run.tokens, run.sources, out.loss))
    if dist.get_rank() == 0:
        print(f"checkpoint {path} ({time.perf_counter() - saving:.1f}s)", flush=True)
    meter.leave_out(time.perf_counter() - saving)  # tokens/s measures training, not saving
    return path


def _tracker(cfg: Config) -> Tracker:
    t = cfg.tracking
    if not t.enabled:
        return Tracker()
    return create_tracker(settings=TrackingSettings(experiment=t.experiment, on_unavailable=t.on_unavailable,
                                                    flush_every_steps=t.flush_every_steps))


def train(cfg: Config, config_path: str | None = None, stop_after: int | None = None,
          resume_from: str | None = None) -> TrainResult:
    """Train (or resume) the run in ``cfg.train.run_dir``. ``stop_after`` ends this process after
    that many steps with a checkpoint, as a preempted job would (used by the resume tests);
    ``resume_from`` (a step or checkpoint name) rolls the run back to that checkpoint first."""
    if not cfg.train.data:
        raise ConfigError(f"{config_path or 'config'}: train.data: set it to the output directory of `nulls prep`")
    _set_cpu_threads()
    init_model_parallel(cfg.parallel, cfg.seed)
    # `latest` only ever names a complete checkpoint, so it can be read before the debris of killed saves is cleaned.
    resumed = resume_point(cfg, resume_from)
    state = read_train_state(resumed) if resumed is not None else None
    if state is not None and int(state["step"]) >= cfg.train.steps:
        return _finished(resumed, state, cfg.train.steps, dist.get_rank())
    run = build(cfg, resumed)
    t = cfg.train
    end = t.steps if stop_after is None else min(t.steps, run.start + stop_after)
    result = TrainResult(steps_run=0, final_step=run.start, resumed_from=str(resumed) if resumed else None)
    tracker = _tracker(cfg)
    with tracker, StopRequest(Path(t.run_dir)) as stop, contextlib.closing(run.loader):
        stop.clear_stale()
        result.run_id = tracker.start(t.run_dir, cfg, run_name=cfg.tracking.run_name or None,
                                      tags={"nulls.engine": t.engine.value, "nulls.world_size": dist.get_world_size()},
                                      artifacts=_artifacts(cfg, config_path))
        meter = _Throughput()
        for step in range(run.start, end):
            out = train_step(run, step)
            meter.add(out.tokens)
            result.losses.append(out.loss)
            result.final_step = out.step
            if out.step % t.log_every == 0 or out.step == end:
                _log_step(run, out, tracker, meter)
            stopping = out.step < end and stop.agreed()
            if (t.save_every and out.step % t.save_every == 0) or out.step == end or stopping:
                result.checkpoint = _save(run, out, meter)
            if stopping:
                result.stopped_by = stop.reason
                if dist.get_rank() == 0:
                    stop.file.unlink(missing_ok=True)
                    print(f"stopped after step {out.step} ({result.stopped_by}); rerun the same command to resume",
                          flush=True)
                break
        result.last_loss = result.losses[-1] if result.losses else None
        result.steps_run = result.final_step - run.start
        if result.checkpoint:  # the provenance of the weights this run ends with
            last = Path(result.checkpoint)
            tracker.log_files([last / "sinks" / "manifest.json", last / "backbone" / "nulls_backbone.json",
                               last / "train_state.json"], f"checkpoints/{last.name}")
    dist.barrier()
    return result

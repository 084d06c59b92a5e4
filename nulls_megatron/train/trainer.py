"""`nulls train`: the training loop, the same on 2 CPU processes (gloo) and on a GPU cluster (NCCL).

One step: every data-parallel replica draws ``global_batch_rows / (micro_batch_rows x DP)``
micro-batches from its slice of the shards, the engine runs forward/backward through the
pipeline schedule, reduces and clips gradients and takes an AdamW step at the scheduled lr.
Rank 0 prints a progress line and logs metrics to MLflow; checkpoints are written every
``save_every`` steps and at the end, and a restarted job continues from ``latest`` with
bit-identical results (same data, same weights, same optimizer state).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ..checkpoint.provenance import describe_sources_manifest
from ..checkpoint.sinks import SourceState, read_sink_manifest, source_state
from ..config import Config, ConfigError, Engine as EngineName
from ..model.gpt import build_nulls_gpt
from ..process_groups import init_model_parallel
from ..sinks.assignment import assignment_from_config
from .checkpointing import load_checkpoint, prepare_checkpoint_root, read_train_state, resume_point, save_checkpoint
from .engines.base import Engine
from .grad_norm import NonFiniteError
from .loader import PackedLoader
from .prefetch import PrefetchLoader
from .lr_schedule import learning_rate
from .precision import bf16_model_overrides, use_bf16
from .sink_stats import sink_statistics
from .tracking import Tracker, TrackingSettings, create_tracker, format_progress

logger = logging.getLogger(__name__)


STOP_FILE = "STOP"  # <run_dir>/STOP: checkpoint after the current step and exit (SLURM's pre-timeout trap writes it)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """A request to checkpoint and exit early: SIGTERM/SIGUSR1 to any rank, or ``<run_dir>/STOP``.

    Checked once per step with one all-reduce, so every rank stops after the same step; a file
    works across nodes whatever the launcher does with signals (torchrun kills its workers
    30 s after forwarding SIGTERM, too soon for a large checkpoint).
    """

    def __init__(self, run_dir: Path) -> None:
        self.file = run_dir / STOP_FILE
        self.signal: int | None = None
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._received)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _received(self, signum: int, frame) -> None:
        self.signal = signum

    def agreed(self) -> bool:
        """True on every rank when any rank saw a request; ``reason`` then names it on every rank."""
        flags = torch.tensor([self.signal or 0, int(dist.get_rank() == 0 and self.file.exists())])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signum, file = (int(v) for v in flags)
        self.reason = signal.Signals(signum).name if signum else str(self.file) if file else None
        return self.reason is not None


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
    from .engines.megatron_ddp import MegatronDDPEngine

    model = build_nulls_gpt(cfg, **(bf16_model_overrides() if bf16 else {}))
    return MegatronDDPEngine(model, cfg, bf16=bf16)


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


def _finished(resumed: Path, total: int, rank: int) -> TrainResult:
    state = read_train_state(resumed)
    loss = state.get("loss")
    if rank == 0:
        print(f"run already finished: step {state['step']} of {total}, checkpoint {resumed}"
              + (f", last loss {loss:.4f}" if loss is not None else "") + " (raise train.steps to train further)", flush=True)
    return TrainResult(steps_run=0, final_step=int(state["step"]), losses=[], resumed_from=str(resumed),
                       checkpoint=str(resumed), last_loss=loss)


def train(cfg: Config, config_path: str | None = None, stop_after: int | None = None,
          resume_from: str | None = None) -> TrainResult:
    """Train (or resume) the run in ``cfg.train.run_dir``. ``stop_after`` ends this process after
    that many steps with a checkpoint, as a preempted job would (used by the resume tests);
    ``resume_from`` (a step or checkpoint name) rolls the run back to that checkpoint first."""
    if not cfg.train.data:
        raise ConfigError(f"{config_path or 'config'}: train.data: set it to the output directory of `nulls prep`")
    _set_cpu_threads()
    init_model_parallel(cfg.parallel, cfg.seed)
    rank, dp_rank = dist.get_rank(), parallel_state.get_data_parallel_rank()
    dp_world = parallel_state.get_data_parallel_world_size()
    n_micro = micro_batches_per_step(cfg, dp_world)
    # `latest` only ever names a complete checkpoint, so it can be read before the debris of killed
    # saves is cleaned. Its forgotten sources (erased or suppressed) are known before the loader
    # exists: training after unlearning must not feed their documents again, and the prefetch thread
    # must not pack one even a batch ahead.
    resumed = resume_point(cfg, resume_from)
    if resumed is not None and int(read_train_state(resumed)["step"]) >= cfg.train.steps:
        return _finished(resumed, cfg.train.steps, rank)
    off = source_state(read_sink_manifest(resumed)).off_sources() if resumed is not None else []
    off = sorted(set(off) | set(cfg.train.exclude_sources))
    loader = PrefetchLoader(PackedLoader(
        cfg.train.data, cfg.model.seq_length, cfg.train.micro_batch_rows, vocab_size=cfg.model.vocab_size,
        seed=cfg.seed, dp_rank=dp_rank, dp_world=dp_world, verify=cfg.train.verify_shards,
        max_document_tokens=cfg.train.max_document_tokens, skip_sources=off), depth=2 * n_micro)
    engine = build_model_and_engine(cfg, n_micro)
    assignment = assignment_from_config(cfg.nulls)
    prepare_checkpoint_root(cfg)

    start, tokens, sources = 0, 0, SourceState()
    if resumed is not None:
        state, sources = load_checkpoint(resumed, engine, loader)
        start, tokens = int(state["step"]), int(state["tokens"])
        if sources.off_sources() != off:
            raise RuntimeError(f"{resumed}: the sink manifest changed while it was loaded (off sources "
                               f"{off[:5]}... then {sources.off_sources()[:5]}...)")
        if rank == 0:
            print(f"resuming from {resumed} (step {start})", flush=True)
            if off:
                print(f"{len(off)} sources are off in {resumed.name} ({len(sources.disabled_sources)} erased, "
                      f"{len(sources.suppressed_sources)} suppressed): their documents will be skipped", flush=True)

    if sources.sources_manifest is None:  # which titles the source indices stand for, for `nulls unlearn`
        sources.sources_manifest = describe_sources_manifest(cfg.train.data) if rank == 0 else None
    t, total = cfg.train, cfg.train.steps
    result = TrainResult(steps_run=0, final_step=start, resumed_from=str(resumed) if resumed else None)
    tracking = cfg.tracking
    tracker = create_tracker(settings=TrackingSettings(experiment=tracking.experiment,
                                                      on_unavailable=tracking.on_unavailable,
                                                      flush_every_steps=tracking.flush_every_steps)) \
        if tracking.enabled else Tracker()
    with tracker, StopRequest(Path(cfg.train.run_dir)) as stop, contextlib.closing(loader):
        if rank == 0 and stop.file.exists():
            # Written by an earlier job's pre-timeout trap that then crashed before consuming it: obeying
            # it would stop this submission after one step with exit 0 and no requeue.
            age = time.time() - stop.file.stat().st_mtime
            stop.file.unlink(missing_ok=True)
            print(f"removed a stale {stop.file} (written {age / 60:.0f} min ago, before this run started)", flush=True)
        result.run_id = tracker.start(cfg.train.run_dir, cfg, run_name=tracking.run_name or None,
                                      tags={"nulls.engine": t.engine.value, "nulls.world_size": dist.get_world_size()},
                                      artifacts=_artifacts(cfg, config_path))
        began, window_start, window_tokens = time.perf_counter(), time.perf_counter(), 0
        end = total if stop_after is None else min(total, start + stop_after)
        step = start
        for step in range(start, end):
            batches = [next(loader) for _ in range(n_micro)]
            lr = learning_rate(step, total, cfg.optimizer)
            try:
                loss, grad_norm = engine.train_step(batches, lr)
            except NonFiniteError as e:
                raise NonFiniteError(f"step {step + 1}: {e}; stopped before saving: the checkpoints on disk are "
                                     "the last good state") from None
            step_tokens = _global_tokens(batches)
            tokens += step_tokens
            window_tokens += step_tokens
            loss = _pipeline_loss(loss)
            done = step + 1
            _check_finite(done, loss, grad_norm)
            result.losses.append(loss)
            if done % t.log_every == 0 or done == end:
                now = time.perf_counter()
                tps = window_tokens / max(now - window_start, 1e-9)
                metrics = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps, "tokens": tokens}
                metrics.update(sink_statistics(batches, assignment, parallel_state.get_data_parallel_group()))
                if off:  # only runs that continue after unlearning have these
                    metrics.update(_skipped_forgotten(loader))
                tracker.log_step(done, metrics)
                if rank == 0:
                    print(format_progress(done, total, loss, tps, now - began, start_step=start), flush=True)
                window_start, window_tokens = now, 0
            stopping = done < end and stop.agreed()
            if (t.save_every and done % t.save_every == 0) or done == end or stopping:
                saving = time.perf_counter()
                result.checkpoint = str(save_checkpoint(cfg, done, engine, loader, tokens, sources, loss))
                if rank == 0:
                    print(f"checkpoint {result.checkpoint} ({time.perf_counter() - saving:.1f}s)", flush=True)
                window_start += time.perf_counter() - saving  # tokens/s measures training, not saving
            if stopping:
                result.stopped_by = stop.reason
                if rank == 0:
                    stop.file.unlink(missing_ok=True)
                    print(f"stopped after step {done} ({result.stopped_by}); rerun the same command to resume", flush=True)
                break
        else:
            step = end - 1
        result.final_step = max(step + 1, start)
        result.last_loss = result.losses[-1] if result.losses else None
        result.steps_run = result.final_step - start
        if result.checkpoint:  # the provenance of the weights this run ends with
            last = Path(result.checkpoint)
            tracker.log_files([last / "sinks" / "manifest.json", last / "backbone" / "nulls_backbone.json",
                               last / "train_state.json"], f"checkpoints/{last.name}")
    dist.barrier()
    return result

"""Run configuration: dataclasses with the defaults, loaded from YAML and validated.

Every error names the file and the dotted field (``model.hidden_size``), says
what is wrong and, for an unknown key, suggests the closest valid one.
Overrides use the same dotted names: ``model.num_layers=4``.
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

# The loader lives in a leaf that data_prep shares; its names stay importable from here.
from yaml_config import (ConfigError, DuplicateKeyError, StrictLoader, config_error,  # noqa: F401
                         dataclass_from_dict, load_yaml_dataclass, parse_overrides, read_yaml)


ATTENTION_BACKENDS = ("auto", "sdpa", "flex", "masked")
RECOMPUTE_MODES = ("none", "full", "selective")


@dataclass
class ModelConfig:
    """The LLaMA-style decoder (METHOD.md section 1)."""

    vocab_size: int = 2048
    hidden_size: int = 64
    num_layers: int = 2
    num_attention_heads: int = 4
    num_query_groups: int = 2
    kv_channels: int | None = None  # head dimension; hidden_size // num_attention_heads when unset
    ffn_hidden_size: int = 2080  # I = n_backbone + n_pool
    seq_length: int = 256
    rotary_base: float = 10000.0
    init_std: float = 0.02
    norm_epsilon: float = 1e-5
    tie_embeddings: bool = True
    # auto (flex on CUDA, sdpa on CPU) | sdpa | flex | masked (Megatron's unfused masked softmax,
    # the reference): how packed rows get block-diagonal causal attention (docs/model.md)
    attention_backend: str = "auto"
    # none | full (each layer's forward runs again in backward: one extra forward per layer, and only
    # the layer inputs are kept) | selective (only the core attention, Megatron's; masked backend only)
    recompute: str = "none"

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads


ASSIGNMENTS = ("counter", "upstream")


@dataclass
class UpstreamConfig:
    """The authors' sink hash (sinks/upstream.py), for checkpoints imported by ``nulls import-litgpt``."""

    p_mem: float = 0.013  # each pool neuron is a source's sink with this probability (and the expected mask)
    p_gen: float = 0.061  # backbone fraction: n_backbone = int(I * p_gen); backbone-only scale (p_gen + p_mem) / p_gen
    id_offset: int = 49152  # upstream id of source index s: s + id_offset (Wikipedia: title index + vocab size)


@dataclass
class NullsConfig:
    """How the MLP width splits into backbone and sink pool, and how sinks are drawn."""

    n_backbone: int = 32
    n_pool: int = 2048
    sinks_per_source: int = 32  # k: exactly this many distinct sinks per source
    pool_shards: int = 1  # E: a source's sinks all lie in one of E equal shards
    seed: int = 0  # seed of the sink assignment hash (not of the weights)
    per_layer_sinks: bool = False  # False: the same sinks in every layer, as the paper
    # counter: exactly k sinks per source from this project's hash | upstream: the authors' hash
    # (a Bernoulli number of sinks per source), a compatibility mode for imported checkpoints
    assignment: str = "counter"
    upstream: UpstreamConfig | None = None  # required with assignment: upstream, refused otherwise

    @property
    def p_gen(self) -> float:
        if self.assignment == "upstream" and self.upstream is not None:
            return self.upstream.p_gen
        return self.n_backbone / (self.n_backbone + self.n_pool)

    @property
    def p_mem(self) -> float:
        if self.assignment == "upstream" and self.upstream is not None:
            return self.upstream.p_mem
        return self.sinks_per_source / self.n_pool


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    # The sink pool sharded by rows over this many data-parallel replicas (docs/dispatch.md): each holds
    # 1/EP of every layer's table and receives the tokens of the sources it owns. Must divide
    # nulls.pool_shards and the data-parallel size. Engine megatron (either optimizer).
    expert_parallel: int = 1
    timeout_minutes: int = 60  # every collective; NCCL's 10-minute default is shorter than a 1B checkpoint's save


class EngineName(str, enum.Enum):
    """Which engine runs the step: `train.engine` in YAML (the engines themselves are train/engines/)."""

    MEGATRON = "megatron"  # Megatron-core DDP + its optimizer (TP x PP x DP)
    DEEPSPEED = "deepspeed"  # DeepSpeed ZeRO stage 1/2 over the data-parallel group (TP x DP)


class Precision(str, enum.Enum):
    AUTO = "auto"  # bf16 on GPU, fp32 on CPU
    FP32 = "fp32"
    BF16 = "bf16"


DISTRIBUTED_OPTIMIZER_MODES = ("auto", "on", "off")


@dataclass
class OptimizerConfig:
    """AdamW with linear warmup then cosine decay to ``min_lr`` (at ``train.steps``)."""

    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1  # backbone matrices and embeddings; never norms
    sink_weight_decay: float = 0.0  # must be 0 (validated): decay would shrink every source's rows, seen or not
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0  # global grad-norm clipping; 0 disables
    # Megatron engine: shard AdamW's state and the fp32 master weights over data-parallel ranks
    # (Megatron's distributed optimizer: reduce-scatter of gradients, all-gather of parameters,
    # both overlapped with compute on GPU; its own clipping and NaN check). on | off | auto (on with CUDA)
    distributed: str = "auto"


@dataclass
class TrainConfig:
    data: str = ""  # output directory of `nulls prep` (shards/index.json, tokenizer, manifest)
    run_dir: str = "runs/nulls"  # checkpoints/, logs, mlflow_run.json (the run id in the MLflow store, for resume)
    steps: int = 100
    micro_batch_rows: int = 4  # packed rows of seq_length per micro-batch and rank
    global_batch_rows: int = 8  # rows per optimizer step over all data-parallel replicas
    engine: EngineName = EngineName.MEGATRON
    zero_stage: int = 1  # deepspeed engine only: 1 or 2
    precision: Precision = Precision.AUTO
    save_every: int = 50  # steps between checkpoints (and one at the end)
    keep_last: int = 3
    log_every: int = 1  # steps between progress lines and metric records
    verify_shards: bool = True  # sha256 of every shard against the index when first opened
    max_document_tokens: int = 0  # cut every document to this many tokens (0: whole documents)
    # Sources whose documents are never fed: a retrained oracle is the same run with the forget set here.
    exclude_sources: list[int] = field(default_factory=list)


@dataclass
class TrackingConfig:
    enabled: bool = True
    experiment: str = "nulls"
    run_name: str = ""  # default: the run directory's name
    on_unavailable: str = "fail"  # "fail": stop at start when the tracking server is down; "warn": train on
    flush_every_steps: int = 50


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    nulls: NullsConfig = field(default_factory=NullsConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    seed: int = 1234  # weights and data order

    def validate(self, origin: str = "config") -> "Config":
        _validate(self, origin)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-able values (enums as their strings)."""
        return dataclasses.asdict(self, dict_factory=lambda items: {k: v.value if isinstance(v, enum.Enum) else v
                                                                   for k, v in items})


def _validate(cfg: Config, origin: str) -> None:
    m, n, p, o, t = cfg.model, cfg.nulls, cfg.parallel, cfg.optimizer, cfg.train
    may_be_zero = {"optimizer.min_lr", "optimizer.warmup_steps", "optimizer.weight_decay",
                   "optimizer.sink_weight_decay", "optimizer.clip_grad", "train.save_every",
                   "train.max_document_tokens"}
    for section, name in ((m, "model"), (n, "nulls"), (p, "parallel"), (o, "optimizer"), (t, "train")):
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and f.name != "seed":
                path = f"{name}.{f.name}"
                if value < 0 or (value == 0 and path not in may_be_zero):
                    config_error(origin, path, f"must be {'>= 0' if path in may_be_zero else '> 0'}, got {value}")
    for path, value in (("optimizer.beta1", o.beta1), ("optimizer.beta2", o.beta2)):
        if not value < 1:
            config_error(origin, path, f"must be in (0, 1), got {value}")
    if o.sink_weight_decay != 0:
        # Decoupled decay multiplies every row of the sink table by (1 - lr * decay) each step, gradient
        # or not: the rows of sources absent from the batch would fade, and "a row changes only when a
        # source that owns it is trained on" would no longer hold (docs/training.md, after unlearning).
        config_error(origin, "optimizer.sink_weight_decay",
              f"must be 0, got {o.sink_weight_decay}: weight decay would shrink every sink row at every step, "
              "including the rows of sources the batch does not hold, so sinks would change without their "
              "source being trained on (see docs/training.md, 'Training after unlearning')")
    if o.min_lr > o.lr:
        config_error(origin, "optimizer.min_lr", f"{o.min_lr} exceeds optimizer.lr ({o.lr})")
    if t.zero_stage not in (1, 2):
        config_error(origin, "train.zero_stage", f"must be 1 or 2, got {t.zero_stage}")
    if o.distributed not in DISTRIBUTED_OPTIMIZER_MODES:
        config_error(origin, "optimizer.distributed", f"expected one of {', '.join(DISTRIBUTED_OPTIMIZER_MODES)}, got {o.distributed!r}")
    if t.engine is EngineName.DEEPSPEED and o.distributed == "on":
        config_error(origin, "optimizer.distributed", "on is Megatron's distributed optimizer (engine: megatron); "
                     "the deepspeed engine shards optimizer state with ZeRO (train.zero_stage)")
    if t.engine is EngineName.DEEPSPEED and p.pipeline_parallel != 1:
        config_error(origin, "train.engine", "deepspeed runs tensor x data parallel only; use engine: megatron "
              f"for parallel.pipeline_parallel={p.pipeline_parallel}")
    if p.expert_parallel < 1:
        config_error(origin, "parallel.expert_parallel", f"must be >= 1, got {p.expert_parallel}")
    if n.pool_shards % p.expert_parallel:
        config_error(origin, "parallel.expert_parallel", f"{p.expert_parallel} does not divide nulls.pool_shards "
                     f"({n.pool_shards}): a source's sinks lie in one pool shard, and a shard on one rank")
    if t.global_batch_rows % t.micro_batch_rows:
        config_error(origin, "train.global_batch_rows",
              f"{t.global_batch_rows} is not a multiple of train.micro_batch_rows ({t.micro_batch_rows})")
    if cfg.tracking.on_unavailable not in ("fail", "warn"):
        config_error(origin, "tracking.on_unavailable", f"must be fail or warn, got {cfg.tracking.on_unavailable!r}")
    for path, seed in (("seed", cfg.seed), ("nulls.seed", n.seed)):
        if not 0 <= seed < 2**32:
            config_error(origin, path, f"must be in [0, 2**32), got {seed}")
    if n.n_backbone + n.n_pool != m.ffn_hidden_size:
        config_error(
            origin,
            "nulls.n_backbone + nulls.n_pool",
            f"{n.n_backbone} + {n.n_pool} = {n.n_backbone + n.n_pool} != model.ffn_hidden_size ({m.ffn_hidden_size})",
        )
    _validate_assignment(n, m, origin)
    if n.n_pool % n.pool_shards:
        config_error(origin, "nulls.pool_shards", f"{n.pool_shards} does not divide nulls.n_pool ({n.n_pool})")
    shard = n.n_pool // n.pool_shards
    if n.sinks_per_source > shard:
        config_error(
            origin,
            "nulls.sinks_per_source",
            f"{n.sinks_per_source} exceeds the shard size n_pool / pool_shards = {shard}",
        )
    if m.attention_backend not in ATTENTION_BACKENDS:
        config_error(origin, "model.attention_backend",
              f"expected one of {', '.join(ATTENTION_BACKENDS)}, got {m.attention_backend!r}")
    if m.recompute not in RECOMPUTE_MODES:
        config_error(origin, "model.recompute", f"expected one of {', '.join(RECOMPUTE_MODES)}, got {m.recompute!r}")
    if m.recompute == "selective" and m.attention_backend != "masked":
        # Selective recompute re-runs only the core attention, to drop the [b, heads, s, s] softmax
        # probabilities Megatron's unfused path keeps; SDPA's fused kernels and FlexAttention keep none.
        config_error(origin, "model.recompute",
              f"selective recomputes only the core attention, which saves [b, heads, s, s] probabilities on "
              f"model.attention_backend: masked alone; with {m.attention_backend!r} use full (or none)")
    if m.num_attention_heads % m.num_query_groups:
        config_error(origin, "model.num_query_groups", f"{m.num_query_groups} does not divide model.num_attention_heads ({m.num_attention_heads})")
    if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
        config_error(origin, "model.kv_channels", f"unset, and hidden_size {m.hidden_size} is not a multiple of num_attention_heads {m.num_attention_heads}")
    tp = p.tensor_parallel
    for path, value in (
        ("model.num_attention_heads", m.num_attention_heads),
        ("model.num_query_groups", m.num_query_groups),
        ("nulls.n_backbone", n.n_backbone),
        ("model.vocab_size", m.vocab_size),
    ):
        if value % tp:
            config_error(origin, path, f"{value} is not divisible by parallel.tensor_parallel ({tp})")
    if m.num_layers % p.pipeline_parallel:
        config_error(origin, "model.num_layers", f"{m.num_layers} is not divisible by parallel.pipeline_parallel ({p.pipeline_parallel})")


def _validate_assignment(n: NullsConfig, m: ModelConfig, origin: str) -> None:
    if n.assignment not in ASSIGNMENTS:
        config_error(origin, "nulls.assignment", f"expected one of {', '.join(ASSIGNMENTS)}, got {n.assignment!r}")
    if n.assignment == "counter":
        if n.upstream is not None:
            config_error(origin, "nulls.upstream", "is set but nulls.assignment is counter; the upstream hash applies only "
                  "with nulls.assignment: upstream (remove the section, or set the assignment)")
        return
    u = n.upstream
    if u is None:
        config_error(origin, "nulls.upstream", "nulls.assignment is upstream but the section is missing: give p_mem, p_gen "
              "and id_offset (as in the imported checkpoint's config)")
    for name in ("p_mem", "p_gen"):
        if not 0 < getattr(u, name) < 1:
            config_error(origin, f"nulls.upstream.{name}", f"must be in (0, 1), got {getattr(u, name)}")
    if u.id_offset < 0:
        config_error(origin, "nulls.upstream.id_offset", f"must be >= 0, got {u.id_offset}")
    # The hash has no shards and no layer salt, and upstream splits the width at int(I * p_gen).
    if n.pool_shards != 1:
        config_error(origin, "nulls.pool_shards", f"must be 1 with the upstream assignment (one unsharded pool), got {n.pool_shards}")
    if n.per_layer_sinks:
        config_error(origin, "nulls.per_layer_sinks", "must be false with the upstream assignment (the same sinks in every layer)")
    split = int(m.ffn_hidden_size * u.p_gen)
    if n.n_backbone != split:
        config_error(origin, "nulls.n_backbone", f"{n.n_backbone}, but the upstream model splits its width at "
              f"int(model.ffn_hidden_size * nulls.upstream.p_gen) = int({m.ffn_hidden_size} * {u.p_gen}) = {split}")


def config_from_dict(data: dict, origin: str = "config", overrides: Iterable[str] = ()) -> Config:
    return dataclass_from_dict(Config, data, origin, overrides)


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Read the model/run config from YAML, apply overrides, validate."""
    return load_yaml_dataclass(Config, path, overrides)

"""DeepSpeed ZeRO stage 1/2 over Megatron's data-parallel group (tensor x data parallel).

DeepSpeed gets the model, a client ``torch.optim.AdamW`` over the shared parameter
groups, and Megatron's ``parallel_state`` as its ``mpu``: ZeRO then partitions optimizer
state (stage 1) and gradients (stage 2) over Megatron's data-parallel group only,
so each tensor-parallel rank shards its own slice, and the gradient norm is summed
over the model-parallel group with replicated parameters (norms, sink tables)
counted once. Pipeline parallelism is refused by the config (``train.engine``).

With an expert-parallel sink pool (``parallel.expert_parallel`` = EP > 1) each rank holds 1/EP of the
pool, and its gradient is reduced over the expert-data-parallel group, as DeepSpeed does for the
experts of its own MoE layers: the sink tables form a param group marked ``moe`` and named
``ep_size_<EP>``, their weights carry that ``group_name`` (and Megatron's ``allreduce = False``, the
mark DeepSpeed reads too), and Megatron's expert-parallel and expert-data-parallel groups are handed
to DeepSpeed under that name, so that ZeRO partitions the pool's optimizer state over the
expert-data-parallel group and sums its gradient norm over every shard. DeepSpeed turns its MoE path
on only when it finds one of its own ``MoE`` modules in the model, so the model goes in wrapped
with a parameter-free marker of that class (``_sharded_pool_wrapper``).

On CPU everything runs in fp32 with the gloo backend and nothing is compiled: the client
optimizer is plain torch (so DeepSpeed never JIT-builds its CPU Adam) and the shared-memory
comm op is switched off (``import_deepspeed``). docs/engines.md has what was measured.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Iterable

import torch
import torch.distributed as dist

from ..precision import use_bf16
from ...compat import skip_deepspeed_shm_build
from ...config import Config
from ..device import batch_to_device
from ..grad_norm import NonFiniteError, first_non_finite
from ..packing import PackedRows
from .base import OPTIMIZER_MOMENTS, Engine
from .param_groups import adamw_param_groups

# DeepSpeed's step_per_print would log every N steps; the trainer logs itself.
_NEVER_PRINT = 2**31 - 1


def import_deepspeed() -> Any:
    """Import deepspeed, quietly, pinned to the CPU accelerator when there is no GPU."""
    if not torch.cuda.is_available():
        # Without it DeepSpeed probes for CUDA/XPU/NPU/... and then warns "Setting accelerator
        # to CPU. If you have GPU or other accelerator, we were unable to detect it" on every
        # rank; naming the accelerator skips the probe and the warning. Only when CUDA is
        # absent, so that a GPU machine keeps DeepSpeed's own detection.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    skip_deepspeed_shm_build()

    # Its INFO lines (config dumps, timers, "Creating ZeRO optimizer ...") drown the trainer's.
    ds_logger.setLevel(logging.WARNING)
    return deepspeed


def _masked_mean(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    # Same reduction as train/step.py::_masked_mean_loss, so both engines report the same loss.
    return (per_token_loss.float() * loss_mask).sum() / loss_mask.sum().clamp(min=1)


def deepspeed_config(cfg: Config, num_micro_batches: int, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config dict for ``cfg`` (ZeRO stage, accumulation, clipping, precision)."""
    if cfg.train.zero_stage not in (1, 2):
        raise ValueError(f"train.zero_stage must be 1 or 2 for the deepspeed engine, got {cfg.train.zero_stage}")
    if num_micro_batches < 1:
        raise ValueError(f"num_micro_batches must be >= 1, got {num_micro_batches}")
    return {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_rows,
        "gradient_accumulation_steps": num_micro_batches,
        "gradient_clipping": float(cfg.optimizer.clip_grad),
        "zero_optimization": {"stage": cfg.train.zero_stage},
        # A client torch AdamW is not on ZeRO's list of tested optimizers; it is what we want
        # (no fused or JIT-compiled ops) and DeepSpeed steps it on the flat fp32 partitions.
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "steps_per_print": _NEVER_PRINT,
        "wall_clock_breakdown": False,
    }


class MegatronMPU:
    """``megatron.core.parallel_state`` as DeepSpeed's ``mpu``.

    DeepSpeed calls ``mpu.get_model_parallel_world_size()`` / ``get_model_parallel_rank()``
    (the old Megatron-LM names), which megatron-core 0.16 no longer has: passing the module
    itself fails in ``deepspeed.initialize`` with ``AttributeError: module
    'megatron.core.parallel_state' has no attribute 'get_model_parallel_world_size'``.
    Everything else is delegated unchanged.
    """

    def __init__(self) -> None:
        from megatron.core import parallel_state

        self._ps = parallel_state

    def __getattr__(self, name: str) -> Any:
        if name == "_ps":  # not set yet (copy/unpickle): fail instead of recursing
            raise AttributeError(name)
        return getattr(self._ps, name)

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(group=self._ps.get_model_parallel_group())

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(group=self._ps.get_model_parallel_group())


def expert_group_name(expert_parallel: int) -> str:
    """DeepSpeed's name for the expert groups of size ``expert_parallel`` (its checkpoint code parses it)."""
    return f"ep_size_{expert_parallel}"


def _hand_expert_groups_to_deepspeed(name: str) -> None:
    """Register Megatron's expert-parallel and expert-data-parallel groups of this rank as DeepSpeed's
    groups ``name``: DeepSpeed then reduces and partitions over exactly the groups the model's dispatch
    and Megatron's DDP use, instead of creating its own. Replaces a stale entry of an earlier model."""
    from deepspeed.utils import groups as ds_groups
    from megatron.core import parallel_state

    for groups, ranks, group in (
        (ds_groups._EXPERT_PARALLEL_GROUP, ds_groups._EXPERT_PARALLEL_GROUP_RANKS,
         parallel_state.get_expert_model_parallel_group()),
        (ds_groups._EXPERT_DATA_PARALLEL_GROUP, ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS,
         parallel_state.get_expert_data_parallel_group()),
    ):
        groups[name] = group
        ranks[name] = dist.get_process_group_ranks(group)


def _sharded_pool_wrapper(model: torch.nn.Module, expert_parallel: int, pool_shards: int) -> torch.nn.Module:
    """``model`` inside a module that also holds a parameter-free subclass of DeepSpeed's ``MoE``:
    the only thing DeepSpeed's engine looks for to take its expert path (``has_moe_layers``). Its
    ``set_deepspeed_parallelism`` (called by the engine once ``groups.mpu`` is set) hands Megatron's
    expert groups to DeepSpeed; it never runs a forward."""
    from deepspeed.moe.layer import MoE

    name = expert_group_name(expert_parallel)

    class ShardedSinkPool(MoE):
        def __init__(self) -> None:
            torch.nn.Module.__init__(self)  # not MoE's: no experts, no gate, no parameters
            self.num_experts, self.ep_size, self.expert_group_name = pool_shards, expert_parallel, name
            self.enable_expert_tensor_parallelism = True

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            _hand_expert_groups_to_deepspeed(self.expert_group_name)

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("ShardedSinkPool only marks the model as expert-parallel for DeepSpeed")

    class ExpertParallelModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model, self.sharded_sink_pool = model, ShardedSinkPool()

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return self.model(*args, **kwargs)

    return ExpertParallelModel()


def _expert_param_groups(param_groups: list[dict], expert_parallel: int) -> list[dict]:
    """The sink group as DeepSpeed's MoE param group: ``moe`` set and named after the expert groups,
    whose name each sink weight also carries (``group_name``), as DeepSpeed's own expert weights do."""
    name = expert_group_name(expert_parallel)
    for group in param_groups:
        if group["name"] != "sinks":
            continue
        for param in group["params"]:
            if getattr(param, "allreduce", True) is not False:
                raise ValueError(f"a sink table of shape {tuple(param.shape)} is not expert-parallel (allreduce is not "
                                 "False): build the model after init_model_parallel with parallel.expert_parallel > 1")
            param.group_name = name
        group.update(name=name, moe=True)
    return param_groups


class DeepSpeedZeroEngine(Engine):
    """``model`` (this rank's TP shard of a NullsGPTModel, PP=1) trained by DeepSpeed ZeRO 1/2.

    ``num_micro_batches`` is the number of micro-batches this rank runs per optimizer step
    (DeepSpeed's gradient_accumulation_steps); ``train_step`` must get exactly that many.
    """

    def __init__(self, model: torch.nn.Module, cfg: Config, num_micro_batches: int) -> None:
        from megatron.core import parallel_state

        if not parallel_state.model_parallel_is_initialized():
            raise RuntimeError(
                "DeepSpeedZeroEngine needs Megatron's parallel state: call "
                "nulls_megatron.process_groups.init_model_parallel before building the model"
            )
        if parallel_state.get_pipeline_model_parallel_world_size() != 1:
            raise ValueError(
                "the deepspeed engine runs tensor x data parallel only, but pipeline parallel size is "
                f"{parallel_state.get_pipeline_model_parallel_world_size()}; use train.engine=megatron"
            )
        deepspeed = import_deepspeed()
        opt = cfg.optimizer
        self.num_micro_batches = num_micro_batches
        self.module = model
        self._dp_group = parallel_state.get_data_parallel_group()
        self._dp_size = parallel_state.get_data_parallel_world_size()
        self._bf16 = use_bf16(cfg)
        expert_parallel = parallel_state.get_expert_model_parallel_world_size()
        param_groups = adamw_param_groups(model, opt)
        if expert_parallel > 1:
            param_groups = _expert_param_groups(param_groups, expert_parallel)
            model = _sharded_pool_wrapper(model, expert_parallel, cfg.nulls.pool_shards)
        optimizer = torch.optim.AdamW(
            param_groups,
            lr=opt.lr,
            betas=(opt.beta1, opt.beta2),
            eps=opt.eps,
            foreach=False,
            fused=False,
        )
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            mpu=MegatronMPU(),
            config=deepspeed_config(cfg, num_micro_batches, self._bf16),
        )
        # ZeRO's wrapper; its .optimizer is the client AdamW, stepping flat fp32 partitions.
        self._zero = self.engine.optimizer
        self._init_optimizer_state()

    # -- training -----------------------------------------------------------------------------
    def _forward_loss(self, batch: PackedRows) -> torch.Tensor:
        batch = batch_to_device(batch, self.engine.device)
        per_token = self.engine(batch.tokens, labels=batch.labels, source_ids=batch.source_ids,
                                document_ids=batch.document_ids)
        return _masked_mean(per_token, batch.loss_mask)

    def _dp_mean(self, losses: list[torch.Tensor]) -> float:
        mean = torch.stack(losses).mean().float().reshape(1)
        if self._dp_size > 1:
            dist.all_reduce(mean, group=self._dp_group)
            mean /= self._dp_size
        return float(mean.item())

    def train_step(self, micro_batches: list[PackedRows], lr: float) -> tuple[float | None, float]:
        if len(micro_batches) != self.num_micro_batches:
            raise ValueError(
                f"train_step got {len(micro_batches)} micro-batches, but the engine was built for "
                f"num_micro_batches={self.num_micro_batches} (DeepSpeed's gradient_accumulation_steps)"
            )
        for group in self._zero.param_groups:
            group["lr"] = lr
        self.engine.train()
        losses = []
        for batch in micro_batches:
            loss = self._forward_loss(batch)
            # DeepSpeed divides by gradient_accumulation_steps itself (scale_wrt_gas) and ZeRO
            # averages over the data-parallel group: the step sees the mean over the global batch.
            self.engine.backward(loss)
            # Only the last micro-batch's step() (the accumulation boundary) reduces and steps.
            self.engine.step()
            losses.append(loss.detach())
        # Before clipping; summed over DP and over TP without double-counting replicated params.
        grad_norm = float(self.engine.get_global_grad_norm())
        if not math.isfinite(grad_norm):
            # ZeRO partitions the gradients and frees them at the step (which it skips on an overflow),
            # so the offending parameter is named only when a non-finite value reached the weights.
            bad = first_non_finite([(n, p.detach()) for n, p in self.module.named_parameters()])
            where = f"first non-finite parameter: {bad}" if bad else \
                "the parameter is not known (ZeRO partitions the gradients; no weight became non-finite)"
            raise NonFiniteError(f"gradient norm {grad_norm} on rank {dist.get_rank()}; {where}")
        return self._dp_mean(losses), grad_norm

    @torch.no_grad()
    def eval_loss(self, micro_batches: list[PackedRows]) -> float | None:
        if not micro_batches:
            raise ValueError("eval_loss needs at least one micro-batch")
        was_training = self.engine.training
        self.engine.eval()
        try:
            losses = [self._forward_loss(batch) for batch in micro_batches]
        finally:
            self.engine.train(was_training)
        return self._dp_mean(losses)

    # -- optimizer state ----------------------------------------------------------------------
    def _flat_states(self) -> list[dict]:
        """AdamW's state of each flat fp32 partition this rank steps."""
        state = self._zero.optimizer.state
        return [state[flat] for flat in self._zero.single_partition_of_fp32_groups if flat in state]

    def optimizer_steps(self) -> int:
        states = self._flat_states()
        # Read from AdamW itself: a step ZeRO skips (non-finite grad norm) does not count.
        return int(states[0]["step"])

    def _check_owned(self, param: torch.nn.Parameter) -> None:
        if not hasattr(param, "_hp_mapping"):
            raise ValueError(
                f"parameter of shape {tuple(param.shape)} is not optimised by this engine (not in the "
                "model given to DeepSpeedZeroEngine, or requires_grad=False)"
            )

    def moments(self, param: torch.nn.Parameter) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_optimizer_state

        self._check_owned(param)
        # Each call all-reduces the param's fragments over the DP group into the full tensor.
        return {key: safe_get_full_optimizer_state(param, key).detach().cpu().clone() for key in OPTIMIZER_MOMENTS}

    def _init_optimizer_state(self) -> None:
        """Create AdamW's state on every flat partition now, as its first step would, and link
        ZeRO's per-parameter views (``_hp_mapping``) to it.

        Why not leave it lazy: DeepSpeed 0.19.8 links the views once, inside the step of param
        group 0 (``_optimizer_step`` -> ``_lazy_init_hp_params_optimizer_state``), before AdamW
        has created the state of groups 1 and 2; those stay linked to nothing, and
        ``safe_get_full_optimizer_state`` then fails for every norm and sink parameter with
        ``ValueError: exp_avg not found in optimizer state fragment``. With the state present
        AdamW's first step uses it unchanged (step 0, zero moments), so the update is the same.
        """
        state = self._zero.optimizer.state
        scalar_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        for flat in self._zero.single_partition_of_fp32_groups:
            entry = state[flat]
            if entry:
                raise RuntimeError("AdamW state already exists before the first step; expected a fresh optimizer")
            # The keys and types torch.optim.AdamW (foreach=False, fused=False) creates itself.
            entry["step"] = torch.tensor(0.0, dtype=scalar_dtype)
            for key in OPTIMIZER_MOMENTS:
                entry[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)
        self._zero._hp_optimizer_states_linked = False
        self._zero._lazy_init_hp_params_optimizer_state()

    def load_moments(self, moments: Iterable[tuple[torch.nn.Parameter, dict[str, torch.Tensor]]], steps: int) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        # The checkpoint loader wrote the parameters into ``module`` after ZeRO copied them into
        # its fp32 master partitions; without this the next step would start from the old weights.
        self._zero.refresh_fp32_params()
        for entry in self._flat_states():
            entry["step"].fill_(float(steps))
        for param, values in moments:
            self._check_owned(param)
            missing = [key for key in OPTIMIZER_MOMENTS if key not in values]
            if missing:
                raise KeyError(f"moments of parameter of shape {tuple(param.shape)} lack {missing}")
            for key in OPTIMIZER_MOMENTS:
                value = values[key]
                if tuple(value.shape) != tuple(param.shape):
                    raise ValueError(
                        f"{key} has shape {tuple(value.shape)}, but its parameter has shape {tuple(param.shape)}"
                    )
                safe_set_full_optimizer_state(param, value.to(device=param.device, dtype=torch.float32), key)
        self.engine.global_steps = steps

"""Megatron-core's DistributedDataParallel and optimizer, with clipping done here.

Megatron's DDP keeps gradients in contiguous ``main_grad`` buffers and reduces them
across data-parallel replicas in ``finalize_model_grads``, which the pipeline
schedule calls after the last backward; the same function all-reduces the tied
word-embedding gradient between the first and last pipeline stage. Megatron's own
clipping would scale by a NaN norm without a word, so the optimizer is built with
``clip_grad=0`` and the global norm is computed, checked and applied here
(``grad_norm.py``). This replicated engine is the CPU default; with CUDA the default is
the subclass with Megatron's distributed optimizer (``megatron_distributed_optimizer.py``).

bf16 on GPU uses Megatron's mixed-precision optimizer (fp32 main parameters and
moments); on CPU everything is fp32.
"""
from __future__ import annotations

import math

from typing import Iterable

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer.optimizer_config import ParamKey, ParamPredicate
from megatron.core.transformer.module import Float16Module

from ...config import Config
from ...compat import pipeline_schedule_compat
from ..grad_norm import NonFiniteError, clip_by_global_norm, first_non_finite, global_grad_norm
from ..step import forward_backward
from ..packing import PackedRows
from .base import OPTIMIZER_MOMENTS, Engine
from .param_groups import classify_parameters

GROUP_KEY = "nulls_group"  # our tag on each Megatron param group: decay / no_decay / sinks
MAIN_PARAM = "main_param"  # bf16 only: the fp32 master weight, saved beside the moments


class MegatronDDPEngine(Engine):
    def __init__(self, model: torch.nn.Module, cfg: Config, bf16: bool = False) -> None:
        self.module = model
        self.cfg = cfg
        opt = cfg.optimizer
        self._decay = {"decay": opt.weight_decay, "no_decay": 0.0, "sinks": opt.sink_weight_decay}
        transformer_config = model.config
        self.bf16 = bf16
        if bf16:
            if not transformer_config.bf16:
                raise ValueError("MegatronDDPEngine(bf16=True) needs a model built with bf16 "
                                 "(build_nulls_gpt(cfg, **precision.bf16_model_overrides()))")
            # Casts first-stage float inputs to bf16 and the last stage's output back to fp32.
            model_for_ddp = Float16Module(transformer_config, model)
        else:
            model_for_ddp = model
        self.ddp = DistributedDataParallel(config=transformer_config, ddp_config=self._ddp_config(), module=model_for_ddp)
        # The schedule calls these: reduce across DP and tied embeddings after the last micro-batch,
        # and no reduction for the micro-batches before it.
        transformer_config.finalize_model_grads_func = finalize_model_grads
        transformer_config.no_sync_func = self.ddp.no_sync
        groups = classify_parameters(model)
        self._group_of = {id(p): name for name, named in groups.items() for _, p in named}
        overrides = {
            ParamKey(predicate=ParamPredicate(name=f"nulls_{name}", fn=self._member(name))): {GROUP_KEY: name}
            for name in groups
        }
        with self._optimizer_compat():  # FP32Optimizer allocates its loss scale with device="cuda"
            self.optimizer = get_megatron_optimizer(self._optimizer_config(opt, bf16), [self.ddp], config_overrides=overrides)
        self._steps = 0

    def _ddp_config(self) -> DistributedDataParallelConfig:
        # average_in_collective=False: grads are scaled by 1/DP before a sum, the same arithmetic
        # on every backend; overlap off: on gloo an overlapped reduce buys nothing.
        return DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                             use_distributed_optimizer=False)

    def _optimizer_config(self, opt, bf16: bool) -> MegatronOptimizerConfig:
        return MegatronOptimizerConfig(
            optimizer="adam", lr=opt.lr, min_lr=opt.min_lr, weight_decay=opt.weight_decay,
            adam_beta1=opt.beta1, adam_beta2=opt.beta2, adam_eps=opt.eps,
            clip_grad=0.0,  # the global norm is checked for NaN/Inf before clipping, in train_step
            bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        )

    def _optimizer_compat(self):
        return pipeline_schedule_compat()


    def _member(self, name: str):
        return lambda param: self._group_of.get(id(param)) == name

    # -- training -------------------------------------------------------------------------------
    def train_step(self, micro_batches: list[PackedRows], lr: float) -> tuple[float | None, float]:
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss = forward_backward(self.ddp, micro_batches)
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        grads = [p.main_grad for p in params]
        norm = global_grad_norm(params, grads)
        if not math.isfinite(norm):
            # Before the optimizer step: the weights stay as they were, and nothing is saved.
            bad = first_non_finite([(n, p.main_grad) for n, p in named])
            raise NonFiniteError(f"gradient norm {norm} on rank {dist.get_rank()}; "
                                 f"first non-finite gradient: {bad or 'on another rank'} (the step was not taken)")
        if self.cfg.optimizer.clip_grad > 0:
            clip_by_global_norm(grads, norm, self.cfg.optimizer.clip_grad)
        self._set_lr_and_decay(lr)
        with pipeline_schedule_compat():
            ok, _, _ = self.optimizer.step()
        if not ok:
            raise FloatingPointError(f"optimizer step {self._steps + 1} skipped: non-finite gradients (grad norm {norm})")
        self._steps += 1
        return dp_mean(loss), norm

    def _set_lr_and_decay(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            group["weight_decay"] = self._decay[group[GROUP_KEY]]

    def eval_loss(self, micro_batches: list[PackedRows]) -> float | None:
        with torch.no_grad():
            return dp_mean(forward_backward(self.ddp, micro_batches, forward_only=True))

    # -- optimizer state ------------------------------------------------------------------------
    def optimizer_steps(self) -> int:
        return self._steps

    def _state_param(self, param: torch.nn.Parameter) -> torch.nn.Parameter:
        """The parameter the torch optimizer keys its state by: the fp32 main copy under bf16."""
        for opt in _torch_optimizers(self.optimizer):
            for model_group, main_group in zip(getattr(opt, "float16_groups", []), getattr(opt, "fp32_from_float16_groups", [])):
                for model_param, main_param in zip(model_group, main_group):
                    if model_param is param:
                        return main_param
        return param

    def _state_of(self, param: torch.nn.Parameter) -> dict:
        main = self._state_param(param)
        for opt in _torch_optimizers(self.optimizer):
            if any(main is p for g in opt.optimizer.param_groups for p in g["params"]):
                return opt.optimizer.state[main]
        raise KeyError("parameter is not managed by this engine's optimizer")

    def moments(self, param: torch.nn.Parameter) -> dict[str, torch.Tensor]:
        """AdamW's moments; under bf16 also ``main_param``, the fp32 master weight the optimizer
        steps (the bf16 weight alone would lose the low bits a bit-exact resume needs)."""
        state = self._state_of(param)
        out = {name: state[name].detach().clone() if name in state else torch.zeros_like(param, dtype=torch.float32)
               for name in OPTIMIZER_MOMENTS}
        if self.bf16:
            out[MAIN_PARAM] = self._state_param(param).detach().clone()
        return out

    def load_moments(self, moments: Iterable[tuple[torch.nn.Parameter, dict[str, torch.Tensor]]], steps: int) -> None:
        for param, values in moments:
            main = self._state_param(param)
            if main is not param:
                # The optimizer copied the weights into its fp32 masters when it was built, before
                # the checkpoint was loaded: refresh them (exactly, when the checkpoint has them).
                with torch.no_grad():
                    main.copy_(values[MAIN_PARAM].reshape(main.shape) if MAIN_PARAM in values else param.float())
            state = self._state_of(param)
            state.clear()
            state["step"] = torch.tensor(float(steps))
            for name in OPTIMIZER_MOMENTS:
                state[name] = values[name].to(torch.float32).clone().reshape(param.shape)
        self._steps = steps


def _torch_optimizers(optimizer) -> list:
    """The Megatron optimizers wrapping a torch optimizer (a ChainedOptimizer holds several)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def dp_mean(loss: float | None) -> float | None:
    """Mean of the replicas' losses: the loss of the global batch, the same as DP=1 reports."""
    if loss is None:
        return None
    group = parallel_state.get_data_parallel_group()
    value = torch.tensor([loss], dtype=torch.float64)
    torch.distributed.all_reduce(value, group=group)
    return float(value) / torch.distributed.get_world_size(group)

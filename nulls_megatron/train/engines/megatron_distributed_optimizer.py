"""The Megatron engine with Megatron-core's distributed optimizer (``optimizer.distributed``).

Each data-parallel rank owns a contiguous shard of every gradient bucket: gradients are
reduce-scattered into it, AdamW's moments and the fp32 master weights exist only for it, and the
updated parameters are all-gathered back. On GPU both collectives overlap with compute
(``overlap_grad_reduce`` in the backward, ``overlap_param_gather`` in the next forward), which is why
``sync_params`` exists: after a step the parameters outside this rank's shard are last step's until
the next forward gathers them, so a checkpoint save gathers them first.

The step is Megatron's own ``MegatronOptimizer.step`` in its parts, with one check added: the
global norm (Megatron's ``get_grad_norm``, over the shards and the model-parallel ranks) must be
finite before Megatron's clipping and the update, because under bf16 no grad scaler would notice a
NaN and the clip factor itself would become NaN. ``check_for_nan_in_grad`` also checks each rank's
local buckets before they are communicated. Both stop with ``NonFiniteError`` naming the rank and
the first offending parameter, before the weights change.

The moments are exposed unsharded, as every engine does (``base.py``): the shards are placed into
full tensors and summed over the data-parallel group (each element is owned by exactly one rank), so
checkpoints are the same files as the non-distributed engine's and load into either.

On CPU the same code runs on gloo (torch >= 2.13 has reduce-scatter and all-gather into a tensor)
inside ``compat.distributed_optimizer_compat``; that is how the tests prove it.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

from ...compat import distributed_optimizer_compat, pipeline_schedule_compat
from ..grad_norm import NonFiniteError, first_non_finite
from ..packing import PackedRows
from ..step import forward_backward
from .base import OPTIMIZER_MOMENTS
from .megatron_ddp import MAIN_PARAM, MegatronDDPEngine, dp_mean

MEGATRON_NAN_CHECK = "in local grad norm"  # in the message of check_for_nan_in_grad's RuntimeError


class MegatronDistributedOptimizerEngine(MegatronDDPEngine):
    def __init__(self, model: torch.nn.Module, cfg, bf16: bool = False, overlap: bool = True) -> None:
        # Overlapped everywhere, so that the CPU tests run the GPU path; on gloo it neither helps nor
        # hurts measurably. overlap=False is the synchronous reference the tests compare with.
        self.overlap = overlap
        super().__init__(model, cfg, bf16=bf16)
        # One distributed optimizer, or two with an expert-parallel sink pool: Megatron gives the expert
        # parameters their own, sharded over the expert-data-parallel group.
        self._opts = self._distributed_optimizers()
        self._dense_opt, self._expert_opt = self._opts[0], None
        if len(self._opts) == 2:
            expert_group = parallel_state.get_expert_data_parallel_group()
            (self._expert_opt,) = [o for o in self._opts if o.data_parallel_group is expert_group]
            (self._dense_opt,) = [o for o in self._opts if o is not self._expert_opt]
        self._shard_of = {}  # id(model param) -> the fp32 shard AdamW steps (a view of it, or its master copy)
        for opt in self._opts:
            for models, shards in ((opt.model_fp32_groups, opt.shard_fp32_groups),
                                   (opt.model_float16_groups, opt.shard_fp32_from_float16_groups)):
                for model_group, shard_group in zip(models, shards):
                    for model_param, shard in zip(model_group, shard_group):
                        self._shard_of[id(model_param)] = shard

    def _ddp_config(self) -> DistributedDataParallelConfig:
        return DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True,
                                             overlap_grad_reduce=self.overlap, overlap_param_gather=self.overlap,
                                             check_for_nan_in_grad=True)

    def _optimizer_config(self, opt, bf16: bool) -> MegatronOptimizerConfig:
        config = super()._optimizer_config(opt, bf16)
        config.use_distributed_optimizer = True
        return config

    def _optimizer_compat(self):
        return distributed_optimizer_compat()

    def _distributed_optimizers(self) -> list:
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

        chained = list(getattr(self.optimizer, "chained_optimizers", [self.optimizer]))
        if not all(isinstance(o, DistributedOptimizer) for o in chained) or not 1 <= len(chained) <= 2:
            raise RuntimeError(f"expected Megatron DistributedOptimizers (dense, and expert-parallel sinks), "
                               f"got {[type(o).__name__ for o in chained]}")
        return chained

    # -- training -------------------------------------------------------------------------------
    def train_step(self, micro_batches: list[PackedRows], lr: float) -> tuple[float | None, float]:
        self.ddp.zero_grad_buffer()
        with distributed_optimizer_compat():
            self.optimizer.zero_grad()  # with overlapped param gather: dispatches the first bucket's gather
        try:
            loss = forward_backward(self.ddp, micro_batches)
        except RuntimeError as err:
            if MEGATRON_NAN_CHECK not in str(err):
                raise
            bad = first_non_finite([(n, p.main_grad) for n, p in self.module.named_parameters() if p.requires_grad])
            raise NonFiniteError(f"non-finite gradient on rank {dist.get_rank()} before the data-parallel reduce "
                                 f"(Megatron: {err}); first non-finite gradient: {bad} (the step was not taken)") from err
        opt = self.optimizer  # the distributed optimizer, or the chain of the dense and the expert one
        with distributed_optimizer_compat():
            opt.prepare_grads()
            # Over the shards, the model-parallel ranks and (expert optimizer) the expert-parallel ranks.
            norm = float(opt.get_grad_norm())
            if not math.isfinite(norm):
                # Before clipping and the update: the weights stay as they were, and nothing is saved.
                raise NonFiniteError(f"gradient norm {norm} on rank {dist.get_rank()}; first non-finite gradient: "
                                     f"{self._first_non_finite_shard() or 'on another rank'} (the step was not taken)")
            if self.cfg.optimizer.clip_grad > 0:
                for part in self._opts:
                    clip_grad_by_total_norm_fp32(part.get_parameters(), self.cfg.optimizer.clip_grad, norm,
                                                 part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
            self._set_lr_and_decay(lr)
            ok = opt.step_with_ready_grads()
        if not ok:
            raise FloatingPointError(f"optimizer step {self._steps + 1} skipped (grad norm {norm})")
        self._steps += 1
        return dp_mean(loss), norm

    def _first_non_finite_shard(self) -> str | None:
        return first_non_finite([(n, self._shard_of[id(p)].grad) for n, p in self.module.named_parameters()
                                 if id(p) in self._shard_of])

    def sync_params(self) -> None:
        if self.overlap:
            with pipeline_schedule_compat():
                self.ddp.start_param_sync(force_sync=True)

    # -- optimizer state ------------------------------------------------------------------------
    def _owned_range(self, param: torch.nn.Parameter) -> tuple[int, int] | None:
        """This rank's [start, end) of ``param`` flattened, or None when it owns none of it."""
        if id(param) not in self._shard_of:
            return None
        r = self._opt_for(param)._get_model_param_range_map(param)["param"]
        return (r.start, r.end) if r.size else None

    def _opt_for(self, param: torch.nn.Parameter):
        """The distributed optimizer that shards ``param``: the expert one for an expert-parallel sink table
        (``allreduce = False``, sharded over the expert-data-parallel group), the dense one otherwise."""
        if self._expert_opt is not None and getattr(param, "allreduce", True) is False:
            return self._expert_opt
        return self._dense_opt

    def moments(self, param: torch.nn.Parameter) -> dict[str, torch.Tensor]:
        """Collective over the group ``param``'s optimizer shards over (data-parallel, or expert-data-parallel
        for an expert-parallel sink table): each rank fills the elements it owns."""
        names = list(OPTIMIZER_MOMENTS) + ([MAIN_PARAM] if self.bf16 else [])
        full = torch.zeros(len(names), param.numel(), dtype=torch.float32, device=param.device)
        owned = self._owned_range(param)
        if owned is not None:
            shard = self._shard_of[id(param)]
            state = self._opt_for(param).optimizer.state.get(shard, {})
            for i, name in enumerate(OPTIMIZER_MOMENTS):
                if name in state:
                    full[i, owned[0]:owned[1]] = state[name].detach().float().view(-1)
            if self.bf16:
                full[len(OPTIMIZER_MOMENTS), owned[0]:owned[1]] = shard.detach().float().view(-1)
        dist.all_reduce(full, group=self._opt_for(param).data_parallel_group)
        return {name: full[i].view(param.shape).clone() for i, name in enumerate(names)}

    def load_moments(self, moments: Iterable[tuple[torch.nn.Parameter, dict[str, torch.Tensor]]], steps: int) -> None:
        for param, values in moments:
            owned = self._owned_range(param)
            if owned is None:
                continue
            a, b = owned
            shard = self._shard_of[id(param)]
            with torch.no_grad():
                if self.bf16:  # the master copy was taken from the weights when the optimizer was built
                    source = values[MAIN_PARAM] if MAIN_PARAM in values else param.float()
                    shard.copy_(source.reshape(-1)[a:b].to(torch.float32))
            state = self._opt_for(param).optimizer.state[shard]
            state.clear()
            state["step"] = torch.tensor(float(steps))
            for name in OPTIMIZER_MOMENTS:
                state[name] = values[name].to(torch.float32).reshape(-1)[a:b].clone().view(shard.shape)
        self._steps = steps

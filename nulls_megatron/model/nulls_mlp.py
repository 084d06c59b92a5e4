"""The NULLs MLP as a Megatron-core module: tensor-parallel backbone + sink table.

The backbone SwiGLU is Megatron's own Column/Row-parallel pair (fc1 holds gate
and up, ``stride=2`` as Megatron's MLP, so it reshards across TP sizes); its
output is all-reduced by fc2. The sink table sits beside it, replicated on the
tensor-parallel ranks: each rank computes the live sinks of every token and
adds them after the reduction, so TP changes nothing in the result and costs no
extra communication. With ``parallel.expert_parallel`` > 1 the table is sharded by
rows over Megatron's expert-parallel group (carved out of data parallelism,
METHOD.md section 5) and tokens travel to the rank owning their sinks; its weight is
marked as Megatron marks expert parameters (``allreduce = False``), so that Megatron's
DDP reduces its gradient over the expert-data-parallel group only.

Per-token routing reaches the module through ``routing_context``, an object the
enclosing :class:`~nulls_megatron.model.gpt.NullsGPTModel` shares with all its
NULLs MLPs and sets at the start of every forward (on every pipeline stage).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.transformer.mlp import MLPSubmodules, apply_swiglu_sharded_factory
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from ..sinks.assignment import SinkAssignment
from ..sinks.routing import SinkRouting
from ..sinks.table import SinkTable


@dataclass
class RoutingContext:
    """The routing of the forward pass in flight, shared by all NULLs MLPs of a model."""

    routing: SinkRouting | None = None

    def current(self) -> SinkRouting:
        if self.routing is None:
            raise RuntimeError(
                "a NULLs MLP ran without routing: call NullsGPTModel.forward with source_ids "
                "(or a sink_mode that needs none)"
            )
        return self.routing


class NullsMegatronMLP(MegatronModule):
    def __init__(
        self,
        config: TransformerConfig,
        submodules: MLPSubmodules,
        assignment: SinkAssignment,
        n_backbone: int,
        tp_group: torch.distributed.ProcessGroup | None = None,
    ) -> None:
        super().__init__(config=config)
        if not config.gated_linear_unit or config.activation_func is not F.silu:
            raise ValueError("the NULLs MLP is a SwiGLU: set gated_linear_unit=True and activation_func=F.silu")
        if config.add_bias_linear:
            raise ValueError("the NULLs MLP has no biases: set add_bias_linear=False")
        self.n_backbone = n_backbone
        if tp_group is None:
            tp_group = parallel_state.get_tensor_model_parallel_group()
        self.tensor_parallel_size = tp_group.size()
        self.linear_fc1 = build_module(
            submodules.linear_fc1,
            config.hidden_size,
            2 * n_backbone,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=False,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="fc1",
            tp_group=tp_group,
            stride=2,
        )
        self.linear_fc2 = build_module(
            submodules.linear_fc2,
            n_backbone,
            config.hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="fc2",
            tp_group=tp_group,
        )
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        # The expert-parallel group of process_groups.init_model_parallel (parallel.expert_parallel); not
        # TransformerConfig's expert_model_parallel_size, which Megatron ties to its own MoE layers.
        expert_group = None
        if parallel_state.get_expert_model_parallel_world_size() > 1:
            expert_group = parallel_state.get_expert_model_parallel_group()
        self.sinks = SinkTable(
            assignment,
            config.hidden_size,
            n_backbone,
            init_method=config.init_method,
            output_init_method=config.output_layer_init_method,
            dtype=config.params_dtype,
            device=device,
            expert_group=expert_group,
        )
        if self.sinks.expert_parallel:
            self.sinks.weight.allreduce = False
        self.routing_context = RoutingContext()

    def set_layer_number(self, layer_number: int) -> None:
        """Called by Megatron's TransformerLayer with the global 1-based layer number."""
        self.sinks.layer_number = layer_number - 1

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        """As Megatron's MLP: rank r's fc1 holds [gate_r; up_r], so it is declared as two sharded
        halves (gate, up) that reshard across TP sizes; a plain per-rank shard would interleave
        gate and up rows wrongly when loaded at another TP size. The sink table is included
        under ``sinks.*``; the backbone checkpoint drops it (sink tables are saved on their own)."""
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        singleton = (metadata or {}).get("singleton_local_shards", False)
        for name in ("weight", "bias"):
            key = f"{prefix}linear_fc1.{name}"
            if isinstance(state.get(key), ShardedTensor):
                state[key] = apply_swiglu_sharded_factory(state[key], sharded_offsets, singleton)
        return state

    def forward(self, hidden_states: torch.Tensor, **unused) -> tuple[torch.Tensor, None]:
        routing = self.routing_context.current()
        hidden = hidden_states.shape[-1]
        if self.tensor_parallel_size == 1:
            # On the CPU the whole MLP runs in one function (SinkTable.forward_with_backbone: long sources as
            # one SwiGLU over the backbone's and their sink rows); the linears' weights are read, their forward skipped.
            fused = self.sinks.forward_with_backbone(hidden_states.reshape(-1, hidden), routing,
                                                     self.linear_fc1.weight, self.linear_fc2.weight)
            if fused is not None:
                return fused.view_as(hidden_states), None
        fc1_out, _ = self.linear_fc1(hidden_states)
        gate, up = fc1_out.chunk(2, dim=-1)
        h = F.silu(gate) * up
        scale = self.sinks.backbone_scale(routing)
        if scale != 1.0:
            h = h * scale
        out, _ = self.linear_fc2(h)
        out = self.sinks(hidden_states.reshape(-1, hidden), routing, base=out.reshape(-1, hidden))
        return out.view_as(hidden_states), None

"""The NULLs GPT: Megatron-core's GPTModel with NULLs MLPs and source-aware forward.

Source ids reach every layer this way: ``forward`` receives ``source_ids``
[b, s] beside the input ids (every pipeline stage receives them from its data
iterator, as it receives position ids and the attention mask), builds one
:class:`SinkRouting` for the batch, and hands it to the model's shared
:class:`RoutingContext`, which every NULLs MLP of the stage reads. The routing
is built once per forward and reused by all layers; backward needs no routing
(the sink kernel saves what it needs), except where ``model.recompute: full``
reruns a layer, which then gets the routing of its own forward back (recompute.py).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from ..config import Config
from ..sinks.assignment import Assignment
from ..sinks.routing import RoutingPlan, SinkMode, SinkRouting
from .attention_mask import block_causal_mask
from ..compat import (apply_cpu_compat, cpu_transformer_config_overrides, pipeline_schedule_compat,
                      quiet_unknown_mlp_notice)
from .layer_spec import nulls_gpt_layer_spec
from .nulls_mlp import NullsMegatronMLP, RoutingContext
from .packed_attention import AttentionContext, PackedDotProductAttention, resolve_attention_backend
from .recompute import ForwardContexts, NullsTransformerLayer, check_megatron_recompute


def transformer_config(cfg: Config, **overrides) -> TransformerConfig:
    """Megatron TransformerConfig for ``cfg`` (fp32 and CPU-safe settings when CUDA is absent)."""
    m, p = cfg.model, cfg.parallel
    kwargs = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.head_dim,
        ffn_hidden_size=m.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_std,
        tensor_model_parallel_size=p.tensor_parallel,
        pipeline_model_parallel_size=p.pipeline_parallel,
        sequence_parallel=False,
        pipeline_dtype=torch.float32,  # activations sent between pipeline stages (bf16 on GPU: later)
        cuda_graph_scope=[],  # the default ("full") is deprecated and warns on every build
    )
    if m.recompute == "selective":
        kwargs.update(recompute_granularity="selective", recompute_modules=["core_attn"])
    if apply_cpu_compat():
        kwargs.update(cpu_transformer_config_overrides())
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


class NullsGPTModel(GPTModel):
    def __init__(self, config: TransformerConfig, cfg: Config, pre_process: bool = True, post_process: bool = True):
        if config.sequence_parallel or config.context_parallel_size > 1:
            raise NotImplementedError("the NULLs routing assumes every rank holds whole sequences: no sequence/context parallelism yet")
        super().__init__(
            config=config,
            transformer_layer_spec=nulls_gpt_layer_spec(cfg.nulls, cfg.model.attention_backend),
            vocab_size=cfg.model.vocab_size,
            max_sequence_length=cfg.model.seq_length,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=cfg.model.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=int(cfg.model.rotary_base),
        )
        self.cfg = cfg
        self.routing_context = RoutingContext()
        self.attention_backend = resolve_attention_backend(cfg.model.attention_backend)
        self.attention_context = AttentionContext(backend=self.attention_backend)
        check_megatron_recompute(config, self.attention_backend)
        contexts = ForwardContexts(self.routing_context, self.attention_context)
        mlps = self.nulls_mlps()
        # The expert-parallel dispatcher of this stage's sink tables (they share assignment and group), or None.
        self._dispatcher = mlps[0].sinks.dispatcher if mlps else None
        for module in self.modules():
            if isinstance(module, NullsMegatronMLP):
                module.routing_context = self.routing_context
            elif isinstance(module, PackedDotProductAttention):
                module.attention_context = self.attention_context
            elif isinstance(module, NullsTransformerLayer) and cfg.model.recompute == "full":
                module.forward_contexts = contexts

    def nulls_mlps(self) -> list[NullsMegatronMLP]:
        return [m for m in self.modules() if isinstance(m, NullsMegatronMLP)]

    def forward(
        self,
        input_ids: torch.Tensor | None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        source_ids: torch.Tensor,
        sink_mode: SinkMode | str = SinkMode.TRAIN,
        route_sources: torch.Tensor | int | None = None,
        document_ids: torch.Tensor | None = None,
        routing_plan: RoutingPlan | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Loss per token [b, s] when ``labels`` are given, else logits.

        Args:
            source_ids: [b, s] the source of every token (packed rows may hold several).
            sink_mode: ``train`` (own sinks), ``route`` (the sinks of ``route_sources``:
                one id, or [b, s]), ``expected`` or ``backbone``.
            document_ids: [b, s] document boundaries for the attention mask when two
                documents of one source sit side by side; defaults to ``source_ids``.
            attention_mask: overrides the block-diagonal causal mask (Megatron's boolean
                [b, 1, s, s], True = masked), whatever the attention backend.
            routing_plan: ``train_routing_plan(source_ids, ...)`` built ahead (the training loader
                does it in its thread), so that the forward neither sorts tokens nor hashes sources.

        The block-diagonal causal attention of the packed rows is prepared here, once per
        forward, and shared by all layers: Megatron's mask for the ``masked`` backend, the
        SDPA mask or FlexAttention ``BlockMask`` in the model's ``AttentionContext`` otherwise.
        """
        batch, seq = source_ids.shape
        if position_ids is None:
            position_ids = torch.arange(seq, device=source_ids.device).unsqueeze(0).expand(batch, -1)
        documents = document_ids if document_ids is not None else source_ids
        if attention_mask is None and self.attention_backend == "masked":
            attention_mask = block_causal_mask(documents)
        elif attention_mask is None:
            self.attention_context.prepare(documents)
        mode = SinkMode(sink_mode)
        if self._dispatcher is not None and mode in (SinkMode.TRAIN, SinkMode.ROUTE):
            self.routing_context.routing = self._expert_parallel_routing(source_ids, mode, route_sources)
        elif routing_plan is not None and mode is SinkMode.TRAIN:
            if routing_plan.num_tokens != source_ids.numel():
                raise ValueError(f"routing_plan covers {routing_plan.num_tokens} tokens, source_ids {tuple(source_ids.shape)}")
            self.routing_context.routing = SinkRouting(SinkMode.TRAIN, routing_plan)
        else:
            self.routing_context.routing = self._routing(source_ids, mode, route_sources)
        try:
            return super().forward(input_ids, position_ids, attention_mask, labels=labels, **kwargs)
        finally:
            self.routing_context.routing = None
            self.attention_context.clear()

    def _expert_parallel_routing(self, source_ids: torch.Tensor, mode: SinkMode, route_sources) -> SinkRouting:
        """The dispatch plan of this forward, shared by every layer: collective over the expert-parallel
        group (every rank of it runs a forward at the same time, as its data-parallel replicas do)."""
        if mode is SinkMode.ROUTE:
            source_ids = _route_ids(source_ids, route_sources)
        # Inside the decoder hidden states are [s, b, h]: tokens flatten sequence-major.
        return SinkRouting(mode, dispatch=self._dispatcher.plan(source_ids.t().reshape(-1)))

    @staticmethod
    def _routing(source_ids: torch.Tensor, mode: SinkMode, route_sources) -> SinkRouting:
        # Inside the decoder hidden states are [s, b, h]: tokens flatten sequence-major.
        if mode is SinkMode.TRAIN:
            return SinkRouting(SinkMode.TRAIN, train_routing_plan(source_ids))
        if mode is SinkMode.ROUTE:
            return SinkRouting.route(_route_ids(source_ids, route_sources).t().reshape(-1))
        if mode is SinkMode.EXPECTED:
            return SinkRouting.expected()
        return SinkRouting.backbone_only()


def _route_ids(source_ids: torch.Tensor, route_sources: torch.Tensor | int | None) -> torch.Tensor:
    """The [b, s] source ids a ``route`` forward uses: one id for every token, or one per token."""
    if route_sources is None:
        raise ValueError("sink_mode='route' needs route_sources (one source id or [b, s] ids)")
    if isinstance(route_sources, int):
        return torch.full_like(source_ids, route_sources)
    if route_sources.shape != source_ids.shape:
        raise ValueError(f"route_sources {tuple(route_sources.shape)} must match source_ids {tuple(source_ids.shape)}")
    return route_sources


def train_routing_plan(source_ids: torch.Tensor, assignment: Assignment | None = None,
                       layers: Iterable[int] = ()) -> RoutingPlan:
    """The routing plan of a ``train``-mode forward over ``source_ids`` [b, s], with the sink rows of
    ``layers`` looked up in advance (one entry serves all layers without per-layer sinks). Inside the
    decoder hidden states are [s, b, h], so tokens are planned sequence-major."""
    plan = RoutingPlan.from_token_sources(source_ids.t().reshape(-1))
    for layer in layers if assignment is not None else ():
        plan.rows(assignment, layer)
    return plan


def build_nulls_gpt(cfg: Config, **config_overrides) -> NullsGPTModel:
    """The model for this pipeline stage; model parallelism must be initialised first."""
    config = transformer_config(cfg, **config_overrides)
    quiet_unknown_mlp_notice()
    with pipeline_schedule_compat():  # a tied embedding split over stages is synced via Tensor.cuda()
        return NullsGPTModel(
            config,
            cfg,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
        )

"""Core attention for packed rows without a materialised softmax: SDPA on CPU, FlexAttention on CUDA.

Megatron's unfused ``DotProductAttention`` (the ``masked`` backend, kept as the
reference) takes the boolean mask ``[b, 1, s, s]`` of a packed batch and runs an
fp32 softmax over the full score matrix, saving the probabilities for backward.
:class:`PackedDotProductAttention` drops into the same place of the layer spec
(``self_attention.submodules.core_attention``: same constructor, same forward
signature) and computes the same block-diagonal causal attention with

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` with a boolean
  mask (True = may attend) built once per micro-batch and shared by all layers;
- ``flex``: FlexAttention with a ``BlockMask`` built once per micro-batch from the
  document ids (document-causal ``mask_mod``), the ``flex_attention`` function
  compiled once with ``torch.compile`` on CUDA (eager elsewhere: its forward runs on
  CPU, its backward is CUDA-only).

The document ids reach every layer the way source ids reach the NULLs MLPs:
``NullsGPTModel.forward`` calls :meth:`AttentionContext.prepare` once per forward
and every core attention of the model (of this pipeline stage) reads the shared
:class:`AttentionContext`. When a caller passes its own ``attention_mask`` (Megatron
convention, True = masked) the context stays empty and that mask is used with SDPA.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from .attention_mask import segment_ids

BACKENDS = ("auto", "sdpa", "flex", "masked")


def resolve_attention_backend(backend: str, cuda: bool | None = None) -> str:
    """``auto`` -> ``flex`` on CUDA, ``sdpa`` on CPU; the others stay as they are."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "auto":
        return backend
    if cuda is None:
        cuda = torch.cuda.is_available()
    return "flex" if cuda else "sdpa"


_compiled_flex = None


def flex_attention_fn(device: torch.device):
    """FlexAttention: compiled once per process on CUDA, eager elsewhere."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def document_causal_block_mask(document_ids: torch.Tensor):
    """FlexAttention ``BlockMask`` of the block-diagonal causal attention of packed rows [b, s]."""
    from torch.nn.attention.flex_attention import create_block_mask

    seg = segment_ids(document_ids)
    batch, seq = seg.shape

    def document_causal(b, h, q_idx, kv_idx):
        return (seg[b, q_idx] == seg[b, kv_idx]) & (q_idx >= kv_idx)

    return create_block_mask(document_causal, B=batch, H=None, Q_LEN=seq, KV_LEN=seq, device=document_ids.device)


@dataclass
class AttentionContext:
    """The attention mask of the forward pass in flight, shared by all core attentions of a model.

    ``mask`` is what the backend consumes: a boolean ``[b, 1, s, s]`` (True = may attend) for
    ``sdpa``, a ``BlockMask`` for ``flex``; ``causal`` marks a batch of one-document rows, where
    plain causal attention is the same thing and needs no mask at all.
    """

    backend: str = "sdpa"
    mask: Any = None
    causal: bool = False

    @property
    def ready(self) -> bool:
        return self.causal or self.mask is not None

    def prepare(self, document_ids: torch.Tensor) -> None:
        """Build the mask of this micro-batch once (every layer reuses it)."""
        if document_ids.dim() != 2:
            raise ValueError(f"document ids must be [batch, seq], got shape {tuple(document_ids.shape)}")
        self.clear()
        if self.backend == "flex":
            self.mask = document_causal_block_mask(document_ids)
            return
        if bool((document_ids == document_ids[:, :1]).all()):
            self.causal = True  # every row is one document: SDPA's causal kernel, no mask tensor
            return
        seg = segment_ids(document_ids)
        seq = seg.shape[1]
        lower = torch.ones(seq, seq, dtype=torch.bool, device=seg.device).tril()
        self.mask = ((seg.unsqueeze(2) == seg.unsqueeze(1)) & lower).unsqueeze(1)

    def clear(self) -> None:
        self.mask, self.causal = None, False


class PackedDotProductAttention(MegatronModule):
    """Drop-in core attention (``DotProductAttention``'s constructor and forward) for packed rows.

    query [sq, b, np, hn], key/value [sk, b, ng, hn] (np / ng heads and query groups of this
    tensor-parallel rank) -> context [sq, b, np * hn].
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Any = None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise NotImplementedError("PackedDotProductAttention does not split the sequence (context parallelism)")
        if config.softmax_type != "vanilla":
            raise NotImplementedError(f"softmax_type={config.softmax_type!r}: use the masked attention backend")
        if config.window_size is not None:
            raise NotImplementedError("sliding-window attention: use the masked attention backend")
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.pg_collection = pg_collection
        world = pg_collection.tp.size()
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        projection = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection, world)
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, world)
        self.num_query_groups_per_partition = divide(config.num_query_groups, world)
        head_dim = divide(projection, config.num_attention_heads)
        # (apply_query_key_layer_scaling: Megatron divides the scale by the layer number and
        # multiplies it back inside its fp32 softmax, so the plain scale is the same attention.)
        self.softmax_scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.attention_context = AttentionContext()  # NullsGPTModel replaces it with the model's shared one

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        if packed_seq_params is not None:
            raise NotImplementedError("packed_seq_params (THD): pass document ids to NullsGPTModel instead")
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported")
        # [s, b, heads, hn] -> [b, heads, s, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        ctx = self.attention_context
        dropout = self.dropout_p if self.training else 0.0
        gqa = self.num_attention_heads_per_partition != self.num_query_groups_per_partition
        if attention_mask is None and ctx.ready and ctx.backend == "flex":
            if dropout:
                raise NotImplementedError("FlexAttention has no attention dropout: use the sdpa backend")
            out = flex_attention_fn(q.device)(q, k, v, block_mask=ctx.mask, scale=self.softmax_scale, enable_gqa=gqa)
        else:
            if attention_mask is not None:
                mask, causal = ~attention_mask, False  # Megatron's convention: True = masked
            elif ctx.ready:
                mask, causal = ctx.mask, ctx.causal
            else:
                raise RuntimeError(
                    "packed attention ran without a mask: call NullsGPTModel.forward (which prepares it from "
                    "the document ids) or pass attention_mask; recomputing core attention in backward is "
                    "not supported by this backend"
                )
            if dropout:
                from megatron.core import tensor_parallel

                with tensor_parallel.get_cuda_rng_tracker().fork():
                    out = F.scaled_dot_product_attention(
                        q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=self.softmax_scale, enable_gqa=gqa
                    )
            else:
                out = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, is_causal=causal, scale=self.softmax_scale, enable_gqa=gqa
                )
        # [b, np, s, hn] -> [s, b, np * hn]
        return out.permute(2, 0, 1, 3).reshape(out.shape[2], out.shape[0], self.hidden_size_per_partition)

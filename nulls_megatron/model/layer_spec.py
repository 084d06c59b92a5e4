"""Megatron-core layer spec of a NULLs GPT layer: the local GPT layer with a NULLs MLP."""
from __future__ import annotations

import copy

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from ..config import NullsConfig
from ..sinks.assignment import assignment_from_config
from .nulls_mlp import NullsMegatronMLP
from .packed_attention import PackedDotProductAttention, resolve_attention_backend
from .recompute import NullsTransformerLayer


def nulls_gpt_layer_spec(nulls: NullsConfig, attention_backend: str = "masked") -> ModuleSpec:
    """RMSNorm, RoPE, grouped-query attention and the NULLs MLP.

    ``attention_backend`` (``model.attention_backend``): ``masked`` keeps Megatron's
    unfused ``DotProductAttention`` with an explicit mask (``arbitrary``, so packed rows
    get the block-diagonal causal mask on every softmax path); ``sdpa``/``flex``/``auto``
    put :class:`PackedDotProductAttention` in its place, which reads the mask that
    ``NullsGPTModel.forward`` prepares once per micro-batch (packed_attention.py).
    The layer is :class:`NullsTransformerLayer`: Megatron's, plus ``model.recompute: full``
    (recompute.py).
    """
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
    spec.module = NullsTransformerLayer
    spec.submodules.self_attention.params = {"attn_mask_type": AttnMaskType.arbitrary}
    if resolve_attention_backend(attention_backend) != "masked":
        spec.submodules.self_attention.submodules.core_attention = PackedDotProductAttention
    spec.submodules.mlp = ModuleSpec(
        module=NullsMegatronMLP,
        params={"assignment": assignment_from_config(nulls), "n_backbone": nulls.n_backbone},
        submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
    )
    return spec

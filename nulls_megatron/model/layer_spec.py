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


def nulls_gpt_layer_spec(nulls: NullsConfig) -> ModuleSpec:
    """RMSNorm, RoPE, grouped-query attention and the NULLs MLP.

    Attention takes an explicit mask (``arbitrary``) so that packed rows get the
    block-diagonal causal mask on every softmax path, fused or not.
    """
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
    spec.submodules.self_attention.params = {"attn_mask_type": AttnMaskType.arbitrary}
    spec.submodules.mlp = ModuleSpec(
        module=NullsMegatronMLP,
        params={"assignment": assignment_from_config(nulls), "n_backbone": nulls.n_backbone},
        submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
    )
    return spec

"""Our TP=1 NULLs GPT state dict -> a vanilla Hugging Face ``LlamaForCausalLM``: the explicit key map.

Every copied tensor goes through :func:`_take`, which checks its shape against what the Llama
layout needs, so a model of another shape fails loudly instead of loading garbage.

The MLP folds exactly (METHOD.md section 2), per mode:
- ``backbone``: only the backbone neurons; the backbone-only scale ``(p_gen + p_mem) / p_gen``
  multiplies ``down_proj`` (a linear layer after the product, so scaling its columns is exact);
- ``expected``: the backbone neurons followed by every live sink row; the sinks' expected mask
  ``p_mem`` multiplies their ``down_proj`` columns. Rows of forgotten (disabled) sources are left
  out, so the intermediate size is the live width. With per-layer sinks the live width can differ
  between layers, while Llama has one ``intermediate_size``: narrower layers are padded with
  all-zero neurons (``silu(0) * 0 = 0``: they add nothing, and hold nothing of any source).

Attention: Megatron's fused ``linear_qkv`` stacks, per query group, the group's query heads, then
its key head, then its value head; Hugging Face keeps q, k and v apart, query head ``h`` reading
key/value head ``h // (heads / groups)``, which is the same grouping. Both use rotate-half RoPE with
``inv_freq = base^(-2i/d)`` (Megatron's ``rotary_interleaved=False``), RMSNorm with a weight and no
bias, and scale scores by ``head_dim ** -0.5``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

MODES = ("backbone", "expected", "routed")


@dataclass(frozen=True)
class ModelShape:
    """What the key map needs to know about the model (read from the checkpoint's run config)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_query_groups: int
    head_dim: int
    n_backbone: int
    n_pool: int
    p_mem: float
    p_gen: float
    tie_embeddings: bool

    @classmethod
    def from_config(cls, cfg) -> "ModelShape":
        m, n = cfg.model, cfg.nulls
        return cls(vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_layers=m.num_layers,
                   num_heads=m.num_attention_heads, num_query_groups=m.num_query_groups, head_dim=m.head_dim,
                   n_backbone=n.n_backbone, n_pool=n.n_pool, p_mem=n.p_mem, p_gen=n.p_gen,
                   tie_embeddings=m.tie_embeddings)

    @property
    def backbone_scale(self) -> float:
        return (self.p_gen + self.p_mem) / self.p_gen


class ExportShapeError(ValueError):
    """A checkpoint tensor whose shape is not the one the Llama layout needs."""


def _take(state: Mapping[str, torch.Tensor], key: str, shape: tuple[int, ...]) -> torch.Tensor:
    if key not in state:
        raise ExportShapeError(f"checkpoint has no tensor {key!r}")
    tensor = state[key]
    if tuple(tensor.shape) != shape:
        raise ExportShapeError(f"{key}: shape {tuple(tensor.shape)}, expected {shape}")
    return tensor


def split_qkv(qkv: torch.Tensor, shape: ModelShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's fused [groups x (q_per_group + 2) x head_dim, d] into HF's q, k, v projections."""
    per_group = shape.num_heads // shape.num_query_groups
    grouped = qkv.view(shape.num_query_groups, per_group + 2, shape.head_dim, shape.hidden_size)
    q = grouped[:, :per_group].reshape(shape.num_heads * shape.head_dim, shape.hidden_size)
    k = grouped[:, per_group].reshape(shape.num_query_groups * shape.head_dim, shape.hidden_size)
    v = grouped[:, per_group + 1].reshape(shape.num_query_groups * shape.head_dim, shape.hidden_size)
    return q, k, v


def backbone_mlp(state: Mapping[str, torch.Tensor], layer: int, shape: ModelShape
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gate [n_backbone, d], up [n_backbone, d], down [d, n_backbone] of one layer's backbone."""
    prefix = f"decoder.layers.{layer}.mlp."
    fc1 = _take(state, prefix + "linear_fc1.weight", (2 * shape.n_backbone, shape.hidden_size))
    down = _take(state, prefix + "linear_fc2.weight", (shape.hidden_size, shape.n_backbone))
    gate, up = fc1.chunk(2, dim=0)
    return gate, up, down


def sink_rows(state: Mapping[str, torch.Tensor], layer: int, shape: ModelShape) -> tuple[torch.Tensor, torch.Tensor]:
    """The sink table [n_pool, 3, d] (gate row, up row, down column) and its ``disabled`` flags."""
    prefix = f"decoder.layers.{layer}.mlp.sinks."
    table = _take(state, prefix + "weight", (shape.n_pool, 3, shape.hidden_size))
    disabled = _take(state, prefix + "disabled", (shape.n_pool,)).bool()
    return table, disabled


def folded_mlp(state: Mapping[str, torch.Tensor], layer: int, shape: ModelShape, mode: str
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gate, up, down of the plain SwiGLU equal to the NULLs MLP of ``layer`` in ``mode``."""
    gate, up, down = backbone_mlp(state, layer, shape)
    if mode == "backbone":
        return gate, up, down * shape.backbone_scale
    if mode != "expected":
        raise ValueError(f"mode {mode!r} does not fold into a plain SwiGLU (one of backbone, expected)")
    table, disabled = sink_rows(state, layer, shape)
    live = table[~disabled]
    return (torch.cat([gate, live[:, 0]]), torch.cat([up, live[:, 1]]),
            torch.cat([down, live[:, 2].t() * shape.p_mem], dim=1))


def _pad_rows(t: torch.Tensor, rows: int, dim: int) -> torch.Tensor:
    missing = rows - t.shape[dim]
    if missing == 0:
        return t
    pad_shape = list(t.shape)
    pad_shape[dim] = missing
    return torch.cat([t, t.new_zeros(pad_shape)], dim=dim)


def llama_state_dict(state: Mapping[str, torch.Tensor], shape: ModelShape, mode: str
                     ) -> tuple[dict[str, torch.Tensor], int]:
    """The ``LlamaForCausalLM`` state dict of our model in ``mode`` and its intermediate size.

    ``state``: the TP=1, PP=1 model's ``state_dict()`` (Megatron keys). In ``routed`` mode the MLP
    keys hold the backbone only (``mlp.{gate,up,down}_proj``) and the sink table beside it
    (``mlp.sinks.weight``, forgotten rows zero; ``mlp.sinks.disabled``).
    """
    d, hd = shape.hidden_size, shape.head_dim
    out: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": _take(state, "embedding.word_embeddings.weight", (shape.vocab_size, d)),
        "model.norm.weight": _take(state, "decoder.final_layernorm.weight", (d,)),
    }
    if not shape.tie_embeddings:
        out["lm_head.weight"] = _take(state, "output_layer.weight", (shape.vocab_size, d))
    mlps = []
    for layer in range(shape.num_layers):
        src, dst = f"decoder.layers.{layer}.", f"model.layers.{layer}."
        qkv_rows = (shape.num_heads + 2 * shape.num_query_groups) * hd
        q, k, v = split_qkv(_take(state, src + "self_attention.linear_qkv.weight", (qkv_rows, d)), shape)
        out[dst + "self_attn.q_proj.weight"] = q
        out[dst + "self_attn.k_proj.weight"] = k
        out[dst + "self_attn.v_proj.weight"] = v
        out[dst + "self_attn.o_proj.weight"] = _take(state, src + "self_attention.linear_proj.weight",
                                                     (d, shape.num_heads * hd))
        out[dst + "input_layernorm.weight"] = _take(state, src + "input_layernorm.weight", (d,))
        out[dst + "post_attention_layernorm.weight"] = _take(state, src + "pre_mlp_layernorm.weight", (d,))
        if mode == "routed":
            gate, up, down = backbone_mlp(state, layer, shape)
            table, disabled = sink_rows(state, layer, shape)
            out[dst + "mlp.sinks.weight"] = table.masked_fill(disabled[:, None, None], 0.0)
            out[dst + "mlp.sinks.disabled"] = disabled
            mlps.append((dst, gate, up, down))
        else:
            mlps.append((dst, *folded_mlp(state, layer, shape, mode)))
    intermediate = max(gate.shape[0] for _, gate, _, _ in mlps)
    for dst, gate, up, down in mlps:
        out[dst + "mlp.gate_proj.weight"] = _pad_rows(gate, intermediate, 0)
        out[dst + "mlp.up_proj.weight"] = _pad_rows(up, intermediate, 0)
        out[dst + "mlp.down_proj.weight"] = _pad_rows(down, intermediate, 1)
    return {k: v.detach().contiguous() for k, v in out.items()}, intermediate

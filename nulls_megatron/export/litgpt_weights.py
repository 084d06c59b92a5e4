"""litgpt state dict -> our Megatron NULLs GPT state dict: an explicit key map, every shape checked.

``lit_model.pth`` is a pickle. It is read with ``torch.load(weights_only=True)`` only (tensors and
plain containers; no code runs), and anything else is refused naming the file.

The key map (``i`` a layer, ``nb = int(I * p_gen)`` backbone neurons, the rest the pool):

====================================================  =====================================================
litgpt                                                ours (Megatron-core GPTModel, TP=1)
====================================================  =====================================================
transformer.wte.weight                                embedding.word_embeddings.weight
transformer.h.i.norm_1.weight                         decoder.layers.i.input_layernorm.weight
transformer.h.i.attn.qkv.weight                       decoder.layers.i.self_attention.linear_qkv.weight
  (older litgpt: attn.attn.weight)                      regrouped, see below
transformer.h.i.attn.proj.weight                      decoder.layers.i.self_attention.linear_proj.weight
transformer.h.i.norm_2.weight                         decoder.layers.i.pre_mlp_layernorm.weight
transformer.h.i.mlp.fc_1.weight[:nb]  (gate)          decoder.layers.i.mlp.linear_fc1.weight = [gate; up]
transformer.h.i.mlp.fc_2.weight[:nb]  (up)
transformer.h.i.mlp.proj.weight[:, :nb]               decoder.layers.i.mlp.linear_fc2.weight
fc_1[nb:], fc_2[nb:], proj[:, nb:].T                  decoder.layers.i.mlp.sinks.weight [n_pool, 3, d]
transformer.ln_f.weight                               decoder.final_layernorm.weight
lm_head.weight                                        output_layer.weight (absent when tied)
====================================================  =====================================================

``LLaMAMLPSeqTD`` computes ``proj((silu(fc_1 x) * fc_2 x) * mask)``: fc_1 is the gate, fc_2 the up
projection. Attention: recent litgpt stores ``qkv`` as [all q heads; all k groups; all v groups];
Megatron's ``linear_qkv`` (and litgpt's older ``attn.attn``) holds, per query group, that group's q
heads then its k then its v. Head ``h`` uses kv group ``h // (n_head / n_query_groups)`` in both.
Both use rotate-half rotary embeddings with ``theta_j = base^(-2j/head_size)``, so q and k rows are
copied without permutation.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from .litgpt_config import LitConfig

LIT_WEIGHTS = "lit_model.pth"


class LitCheckpointError(ValueError):
    """A litgpt weights file that is unsafe to read, or whose tensors do not fit its config."""


def load_lit_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in ``lit_model.pth``, read with ``weights_only=True`` (and refused otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise LitCheckpointError(f"{path}: not found (a litgpt checkpoint folder holds {LIT_WEIGHTS} and model_config.yaml)")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # a legacy (non-zip) file cannot be mapped
    except pickle.UnpicklingError as e:
        raise LitCheckpointError(
            f"{path}: refused: it holds more than tensors and plain containers ({_offending(e)}); only weights are "
            "ever read from a litgpt checkpoint (torch.load with weights_only=True), and nothing of the file was "
            "run. Re-save the state dict alone (torch.save(model.state_dict(), ...)) from a source you trust") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise LitCheckpointError(f"{path}: unreadable as a torch checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # litgpt's training checkpoints wrap the state dict as {"model": ...}
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise LitCheckpointError(f"{path}: not a state dict (a mapping of parameter names to tensors)")
    return obj


def _offending(error: Exception) -> str:
    """What torch's weights-only unpickler objected to (its message also suggests weights_only=False,
    which is exactly what must not be done here, so only the reason is kept)."""
    for line in str(error).splitlines():
        line = line.split("WeightsUnpickler error:", 1)[-1].strip()
        if "GLOBAL" in line or line.startswith("Unsupported"):
            return line.split(". Please use", 1)[0].rstrip(".")
    return type(error).__name__


def tied_head(state: dict[str, torch.Tensor]) -> bool:
    """True when the output head is the embedding: no ``lm_head.weight``, or one equal to ``wte``."""
    head, wte = state.get("lm_head.weight"), state.get("transformer.wte.weight")
    return head is None or (wte is not None and head.shape == wte.shape and torch.equal(head, wte))


def _qkv_key(state: dict[str, torch.Tensor], layer: int) -> tuple[str, bool]:
    """The layer's fused QKV key and whether it is the older per-group (``attn.attn``) layout."""
    new, old = f"transformer.h.{layer}.attn.qkv.weight", f"transformer.h.{layer}.attn.attn.weight"
    if new in state and old in state:
        raise LitCheckpointError(f"both {new} and {old} are present: which one is the model's?")
    return (old, True) if old in state else (new, False)


def expected_lit_shapes(c: LitConfig, state: dict[str, torch.Tensor], tied: bool) -> dict[str, tuple[int, ...]]:
    """Every tensor the litgpt model of ``c`` holds, with its shape."""
    d, i = c.n_embd, c.intermediate_size
    shapes = {"transformer.wte.weight": (c.padded_vocab_size, d), "transformer.ln_f.weight": (d,)}
    if not tied or "lm_head.weight" in state:
        shapes["lm_head.weight"] = (c.padded_vocab_size, d)
    for layer in range(c.n_layer):
        h = f"transformer.h.{layer}"
        shapes.update({
            f"{h}.norm_1.weight": (d,), _qkv_key(state, layer)[0]: (c.qkv_rows, d),
            f"{h}.attn.proj.weight": (d, c.n_head * c.head_size), f"{h}.norm_2.weight": (d,),
            f"{h}.mlp.fc_1.weight": (i, d), f"{h}.mlp.fc_2.weight": (i, d), f"{h}.mlp.proj.weight": (d, i),
        })
    return shapes


def check_lit_tensors(c: LitConfig, state: dict[str, torch.Tensor], tied: bool, where: Path) -> None:
    """Every expected tensor present with its shape, a floating dtype, and nothing else in the file."""
    shapes = expected_lit_shapes(c, state, tied)
    missing = sorted(set(shapes) - set(state))
    unknown = sorted(set(state) - set(shapes))
    wrong = [f"{k}: {tuple(state[k].shape)}, expected {shapes[k]} from {c.path.name}"
             for k in sorted(shapes) if k in state and tuple(state[k].shape) != shapes[k]]
    wrong += [f"{k}: dtype {state[k].dtype}" for k in sorted(shapes) if k in state and not state[k].is_floating_point()]
    problems = ([f"missing {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")] if missing else [])
    problems += ([f"tensors the config does not describe (biases? another architecture?): {', '.join(unknown[:5])}"
                  + (" ..." if len(unknown) > 5 else "")] if unknown else [])
    problems += wrong[:5]
    if problems:
        raise LitCheckpointError(f"{where}: does not match {c.path}: " + "; ".join(problems))


def regroup_qkv(w: torch.Tensor, c: LitConfig) -> torch.Tensor:
    """litgpt's [Q; K; V] fused rows to Megatron's per-query-group [q heads of g, k_g, v_g] for every g."""
    q_rows, kv_rows = c.n_head * c.head_size, c.n_query_groups * c.head_size
    q, k, v = w.split((q_rows, kv_rows, kv_rows))
    per_group = c.n_head // c.n_query_groups * c.head_size
    groups = (q.reshape(c.n_query_groups, per_group, -1), k.reshape(c.n_query_groups, c.head_size, -1),
              v.reshape(c.n_query_groups, c.head_size, -1))
    return torch.cat(groups, dim=1).reshape(c.qkv_rows, -1)


def map_state_dict(c: LitConfig, state: dict[str, torch.Tensor], tied: bool, where: Path,
                   dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Our model's state dict (Megatron keys, sink tables included) from a checked litgpt state dict."""
    check_lit_tensors(c, state, tied, where)
    nb = c.n_backbone

    def get(key: str) -> torch.Tensor:
        return state[key].to(dtype)

    out = {"embedding.word_embeddings.weight": get("transformer.wte.weight"),
           "decoder.final_layernorm.weight": get("transformer.ln_f.weight")}
    if not tied:
        out["output_layer.weight"] = get("lm_head.weight")
    for layer in range(c.n_layer):
        h, ours = f"transformer.h.{layer}", f"decoder.layers.{layer}"
        qkv_key, grouped = _qkv_key(state, layer)
        fc_1, fc_2, proj = get(f"{h}.mlp.fc_1.weight"), get(f"{h}.mlp.fc_2.weight"), get(f"{h}.mlp.proj.weight")
        out.update({
            f"{ours}.input_layernorm.weight": get(f"{h}.norm_1.weight"),
            f"{ours}.self_attention.linear_qkv.weight": get(qkv_key) if grouped else regroup_qkv(get(qkv_key), c),
            f"{ours}.self_attention.linear_proj.weight": get(f"{h}.attn.proj.weight"),
            f"{ours}.pre_mlp_layernorm.weight": get(f"{h}.norm_2.weight"),
            f"{ours}.mlp.linear_fc1.weight": torch.cat((fc_1[:nb], fc_2[:nb])),
            f"{ours}.mlp.linear_fc2.weight": proj[:, :nb].contiguous(),
            f"{ours}.mlp.sinks.weight": torch.stack((fc_1[nb:], fc_2[nb:], proj[:, nb:].t()), dim=1),
        })
    return out


def load_into(model: torch.nn.Module, mapped: dict[str, torch.Tensor]) -> None:
    """Copy ``mapped`` into ``model``: every key must exist with the same shape, and every tensor of the
    model must be covered (Megatron's ``_extra_state`` aside; sink ``disabled`` flags are set to off)."""
    target = model.state_dict()
    unknown = sorted(set(mapped) - set(target))
    wrong = [f"{k}: converted {tuple(v.shape)}, model {tuple(target[k].shape)}"
             for k, v in mapped.items() if k in target and v.shape != target[k].shape]
    uncovered = sorted(k for k in target if k not in mapped and not k.endswith(("._extra_state", ".sinks.disabled")))
    if unknown or wrong or uncovered:
        raise LitCheckpointError(f"the converted weights do not fit the model: keys it lacks {unknown[:5]}, "
                                 f"shapes {wrong[:5]}, model tensors left unset {uncovered[:5]}")
    with torch.no_grad():
        for key, value in mapped.items():
            target[key].copy_(value)
        for key, value in target.items():
            if key.endswith(".sinks.disabled"):
                value.zero_()

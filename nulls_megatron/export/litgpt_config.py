"""A litgpt checkpoint's ``model_config.yaml``: read with litgpt's defaults, checked, turned into our Config.

The authors' models are litgpt ``Config``s (``litgpt/config.py``) plus ``p_gen`` and ``p_mem``. Only
what our model computes the same way is accepted: a LLaMA-style decoder (RMSNorm, full rotary
embeddings in the rotate-half convention, grouped-query attention, SwiGLU, no biases, sequential
residuals). Every other litgpt feature (partial rotary, RoPE scaling, soft-capping, QK norms, extra
norms, scaled embeddings, sliding windows, experts) is refused by name rather than silently
computed differently. Fields absent from the file take litgpt's defaults, as ``Config.from_file``
would, so a file that omits ``rotary_percentage`` gets litgpt's 0.25 and is refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError, config_from_dict, read_yaml

LIT_CONFIG = "model_config.yaml"

# litgpt's defaults for the fields whose value changes the computation (litgpt/config.py).
_DEFAULTS: dict[str, Any] = {
    "name": "", "block_size": 4096, "vocab_size": 50254, "padding_multiple": 512, "padded_vocab_size": None,
    "n_layer": 16, "n_embd": 4096, "n_head": 32, "head_size": None, "n_query_groups": None,
    "intermediate_size": None, "norm_class_name": "LayerNorm", "norm_eps": 1e-5, "rope_base": 10000,
    "rotary_percentage": 0.25, "parallel_residual": True, "bias": True,
}
# Fields that must hold exactly this value (litgpt's default when absent): anything else computes
# something our model does not.
_REQUIRED: dict[str, tuple[Any, Any]] = {  # name: (required value, litgpt default)
    "norm_class_name": ("RMSNorm", "LayerNorm"), "rotary_percentage": (1.0, 0.25),
    "parallel_residual": (False, True), "shared_attention_norm": (False, False), "bias": (False, True),
    "attn_bias": (False, False), "lm_head_bias": (False, False), "rope_condense_ratio": (1, 1),
    "rope_adjustments": (None, None), "scale_embeddings": (False, False), "post_attention_norm": (False, False),
    "post_mlp_norm": (False, False), "norm_qk": (False, False), "attention_logit_softcapping": (None, None),
    "final_logit_softcapping": (None, None), "sliding_window_size": (None, None), "n_expert": (0, 0),
    "latent_attention": (None, None), "rope_local_base_freq": (None, None), "norm_1": (True, True),
    "norm_2": (True, True),
}
_MLP_CLASSES = ("LLaMAMLP", "LLaMAMLPSeqTD")


class LitConfigError(ValueError):
    """A litgpt config our model cannot reproduce exactly, or that is not a NULLs model."""


@dataclass(frozen=True)
class LitConfig:
    """The litgpt fields our model needs, after litgpt's own derivations (head size, padded vocab, groups)."""

    path: Path
    name: str
    n_embd: int
    n_layer: int
    n_head: int
    n_query_groups: int
    head_size: int
    intermediate_size: int
    vocab_size: int
    padded_vocab_size: int
    block_size: int
    rope_base: int
    norm_eps: float
    p_gen: float
    p_mem: float

    @property
    def n_backbone(self) -> int:
        """Upstream's split: the first ``int(I * p_gen)`` neurons are always on."""
        return int(self.intermediate_size * self.p_gen)

    @property
    def n_pool(self) -> int:
        return self.intermediate_size - self.n_backbone

    @property
    def qkv_rows(self) -> int:
        return (self.n_head + 2 * self.n_query_groups) * self.head_size


def _same(value: Any, required: Any) -> bool:
    """Equal, and of the same type unless a float is required (``bias: 0`` is not ``false``; 1 is 1.0)."""
    return value == required and (isinstance(required, float) or type(value) is type(required))


def _find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


def _int(raw: dict, name: str, path: Path) -> int:
    value = raw[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LitConfigError(f"{path}: {name} must be a positive integer, got {value!r}")
    return value


def read_lit_config(lit_dir: str | Path) -> LitConfig:
    """``<lit_dir>/model_config.yaml`` as a :class:`LitConfig`; refuses what our model would compute differently."""
    path = Path(lit_dir) / LIT_CONFIG
    try:
        data = read_yaml(path)
    except ConfigError as e:
        raise LitConfigError(str(e)) from None
    if not isinstance(data, dict):
        raise LitConfigError(f"{path}: not a litgpt model config (expected a mapping of Config fields)")
    raw = {**_DEFAULTS, **data}
    wrong = []
    for name, (required, default) in _REQUIRED.items():
        value = raw.get(name, default)
        if not _same(value, required):
            wrong.append(f"{name}: {value!r} (supported: {required!r})")
    if "Gemma" in str(raw["name"]):
        wrong.append(f"name: {raw['name']!r} (litgpt's Gemma RMSNorm adds 1 to its weight)")
    if raw.get("mlp_class_name") not in _MLP_CLASSES:
        wrong.append(f"mlp_class_name: {raw.get('mlp_class_name')!r} (supported: {' or '.join(_MLP_CLASSES)})")
    if raw.get("attention_scores_scalar") not in (None, raw.get("head_size") or raw["n_embd"] // raw["n_head"]):
        wrong.append(f"attention_scores_scalar: {raw['attention_scores_scalar']!r} (supported: null, 1/sqrt(head_size))")
    if wrong:
        raise LitConfigError(f"{path}: a model our Megatron NULLs GPT does not compute exactly: " + "; ".join(wrong))
    missing = [n for n in ("p_gen", "p_mem", "intermediate_size") if raw.get(n) is None]
    if missing:
        raise LitConfigError(f"{path}: no {', '.join(missing)}: not a NULLs (LLaMAMLPSeqTD) model config")
    n_embd, n_head = _int(raw, "n_embd", path), _int(raw, "n_head", path)
    head_size = raw["head_size"] if raw["head_size"] is not None else n_embd // n_head
    groups = raw["n_query_groups"] if raw["n_query_groups"] is not None else n_head
    vocab = _int(raw, "vocab_size", path)
    padded = raw["padded_vocab_size"] or _find_multiple(vocab, _int(raw, "padding_multiple", path))
    rope_base = raw["rope_base"]
    if isinstance(rope_base, float) and rope_base.is_integer():
        rope_base = int(rope_base)  # litgpt types it int; Megatron's GPTModel takes an int base
    cfg = LitConfig(path=path, name=str(raw["name"]), n_embd=n_embd, n_layer=_int(raw, "n_layer", path),
                    n_head=n_head, n_query_groups=groups, head_size=head_size,
                    intermediate_size=_int(raw, "intermediate_size", path), vocab_size=vocab,
                    padded_vocab_size=padded, block_size=_int(raw, "block_size", path), rope_base=rope_base,
                    norm_eps=float(raw["norm_eps"]), p_gen=float(raw["p_gen"]), p_mem=float(raw["p_mem"]))
    _check_shape(cfg)
    return cfg


def _check_shape(c: LitConfig) -> None:
    problems = []
    for name in ("head_size", "n_query_groups", "padded_vocab_size", "rope_base"):
        v = getattr(c, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            problems.append(f"{name} must be a positive integer, got {v!r}")
    if not problems and c.n_head % c.n_query_groups:
        problems.append(f"n_query_groups {c.n_query_groups} does not divide n_head {c.n_head}")
    if not problems and c.head_size % 2:
        problems.append(f"head_size {c.head_size} is odd (rotary embeddings rotate pairs)")
    for name in ("p_gen", "p_mem"):
        if not 0 < getattr(c, name) < 1:
            problems.append(f"{name} must be in (0, 1), got {getattr(c, name)}")
    if not problems and not 1 <= c.n_backbone < c.intermediate_size:
        problems.append(f"int(intermediate_size * p_gen) = {c.n_backbone} leaves no backbone or no pool")
    if problems:
        raise LitConfigError(f"{c.path}: " + "; ".join(problems))


def nulls_config(c: LitConfig, tie_embeddings: bool, id_offset: int) -> Config:
    """Our run config for the imported model: the same decoder, the upstream sink assignment, TP=1."""
    data = {
        "model": {"vocab_size": c.padded_vocab_size, "hidden_size": c.n_embd, "num_layers": c.n_layer,
                  "num_attention_heads": c.n_head, "num_query_groups": c.n_query_groups, "kv_channels": c.head_size,
                  "ffn_hidden_size": c.intermediate_size, "seq_length": c.block_size,
                  "rotary_base": float(c.rope_base), "norm_epsilon": c.norm_eps, "tie_embeddings": tie_embeddings},
        # sinks_per_source is informational with the upstream hash (the count varies): the expected one.
        "nulls": {"n_backbone": c.n_backbone, "n_pool": c.n_pool,
                  "sinks_per_source": max(1, round(c.p_mem * c.n_pool)), "assignment": "upstream",
                  "upstream": {"p_mem": c.p_mem, "p_gen": c.p_gen, "id_offset": id_offset}},
        "tracking": {"enabled": False},
    }
    return config_from_dict(data, origin=f"{c.path} (converted)")

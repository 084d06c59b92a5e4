"""Which precision a run trains in: bf16 on GPU, fp32 on CPU (``train.precision``)."""
from __future__ import annotations

import torch

from ..config import Config, ConfigError, Precision


def use_bf16(cfg: Config) -> bool:
    """``auto``: bf16 when CUDA is present, else fp32. ``bf16`` without CUDA is refused: the
    mixed-precision optimizers of Megatron and DeepSpeed keep their state in CUDA tensors
    (Megatron's asserts ``torch.cuda.BFloat16Tensor`` parameters)."""
    precision = cfg.train.precision
    if precision is Precision.FP32:
        return False
    if torch.cuda.is_available():
        return True
    if precision is Precision.BF16:
        raise ConfigError("train.precision: bf16 trains on GPUs only (the mixed-precision optimizers keep CUDA "
                          "tensors); use auto or fp32 on a machine without CUDA")
    return False


def bf16_model_overrides() -> dict:
    """TransformerConfig overrides for a bf16 model: weights, activations between pipeline stages."""
    return {"bf16": True, "params_dtype": torch.bfloat16, "pipeline_dtype": torch.bfloat16}

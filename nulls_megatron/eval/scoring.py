"""Next-token log-probabilities and greedy continuations of one model, in each deployment mode.

Two kinds of model behind one interface (:class:`EvalModel`): our checkpoints (loaded as a
deployment loads them, any training layout) and folders written by ``nulls export`` (loaded with
transformers, as users load them). Modes (METHOD.md section 2):

- ``own``: the sinks of the document's own source (its true source; for a forgotten source these
  rows are zero after ``nulls unlearn``);
- ``nearest``: the sinks of the nearest surviving source (the paper's Sink-Off);
- ``backbone``: sinks off, backbone rescaled; ``expected``: every live sink at ``p_mem``.

A vanilla Llama export has only the mode it was exported in. A document longer than the context is
scored in consecutive windows of ``seq_length`` predicted tokens, as training reads it.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .documents import Document

SINK_MODES = ("own", "nearest", "backbone", "expected")
ROUTED = ("own", "nearest")


@dataclass
class TokenScores:
    """Per label token of one document: log p(token), and the mean and standard deviation of log p
    under the model's own next-token distribution (what Min-K%++ normalises by)."""

    logprob: np.ndarray
    mean: np.ndarray
    std: np.ndarray

    @property
    def loss(self) -> float:
        return float(-self.logprob.mean())


class EvalModel:
    """What an evaluation needs from a model: logits in a mode, for a batch of token rows."""

    name: str
    modes: tuple[str, ...]
    context: int
    vocab_size: int

    def logits(self, tokens: torch.Tensor, mode: str, sources: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    @contextmanager
    def sources_disabled(self, sources: Sequence[int]) -> Iterator[None]:
        """The model with the rows of ``sources`` off (in memory only), e.g. an oracle made comparable."""
        raise NotImplementedError(f"{self.name}: cannot switch sources off")
        yield


class CheckpointModel(EvalModel):
    """A checkpoint of ours: every mode, in-memory source switching."""

    def __init__(self, checkpoint: str | os.PathLike, manifest: str | os.PathLike | None = None,
                 name: str | None = None) -> None:
        from ..inference.load import load_for_inference

        saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
        try:
            self.loaded = load_for_inference(checkpoint, manifest)
        finally:  # children (trainers launched later) must not inherit this process's gloo port
            for key, value in saved.items():
                os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
        self.name = name or str(self.loaded.checkpoint)
        self.modes = SINK_MODES
        self.context = self.loaded.cfg.model.seq_length
        self.vocab_size = self.loaded.vocab_size

    @property
    def off_sources(self) -> list[int]:
        return self.loaded.sources.state.off_sources()

    def logits(self, tokens: torch.Tensor, mode: str, sources: torch.Tensor | None) -> torch.Tensor:
        zeros = torch.zeros_like(tokens)
        with torch.no_grad():
            if mode in ROUTED:
                route = sources[:, None].expand_as(tokens).contiguous()
                out = self.loaded.model(tokens, source_ids=zeros, sink_mode="route", route_sources=route)
            else:
                out = self.loaded.model(tokens, source_ids=zeros, sink_mode=mode)
        return out[..., : self.vocab_size].float()

    def encode(self, text: str) -> list[int]:
        return self.loaded.tokenizer.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.loaded.tokenizer.decode(list(ids))

    @contextmanager
    def sources_disabled(self, sources: Sequence[int]) -> Iterator[None]:
        tables = [mlp.sinks for mlp in self.loaded.model.nulls_mlps()]
        saved = [t.disabled.clone() for t in tables]
        try:
            for t in tables:
                rows = t.assignment.sinks_of(torch.as_tensor(list(sources), dtype=torch.int64), layer=t.layer_number)
                t.disabled[rows.reshape(-1)] = True
            yield
        finally:
            for t, s in zip(tables, saved):
                t.disabled.copy_(s)


class ExportedModel(EvalModel):
    """A folder written by ``nulls export``: a vanilla Llama has its export mode only; a routed
    export every mode."""

    def __init__(self, folder: str | os.PathLike, name: str | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = Path(folder)
        info_path = folder / "nulls_export.json"
        if not info_path.is_file():
            raise FileNotFoundError(f"{info_path}: not a folder written by `nulls export`")
        self.info = json.loads(info_path.read_text())
        self.export_mode = self.info["mode"]
        self.model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=self.export_mode == "routed",
                                                          dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.name = name or str(folder)
        self.modes = SINK_MODES if self.export_mode == "routed" else (self.export_mode,)
        self.context = int(self.model.config.max_position_embeddings)
        self.vocab_size = len(self.tokenizer)

    @property
    def off_sources(self) -> list[int]:
        return sorted(set(self.info["forgotten_sources"]) | set(self.info["suppressed_sources"]))

    def logits(self, tokens: torch.Tensor, mode: str, sources: torch.Tensor | None) -> torch.Tensor:
        if mode not in self.modes:
            raise ValueError(f"{self.name}: a {self.export_mode} export has no {mode!r} mode")
        kwargs = {}
        if self.export_mode == "routed":
            kwargs = {"source_ids": sources, "allow_forgotten": True} if mode in ROUTED else {"sink_mode": mode}
        with torch.no_grad():
            out = self.model(tokens, use_cache=False, **kwargs).logits
        return out[..., : self.vocab_size].float()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))


def open_model(path: str | os.PathLike, manifest: str | os.PathLike | None = None, name: str | None = None) -> EvalModel:
    """A checkpoint of ours or a ``nulls export`` folder, whichever ``path`` is."""
    if (Path(path) / "nulls_export.json").is_file():
        return ExportedModel(path, name)
    return CheckpointModel(path, manifest, name)


def _windows(doc: Document, context: int) -> list[tuple[np.ndarray, np.ndarray]]:
    t = doc.tokens
    return [(t[i:i + context], t[i + 1:i + context + 1]) for i in range(0, len(t) - 1, context)]


def token_scores(model: EvalModel, docs: Sequence[Document], mode: str, routes: Sequence[int] | None = None,
                 batch_rows: int = 8) -> list[TokenScores]:
    """:class:`TokenScores` of every document; ``routes``: the source whose sinks each document uses
    in ``own``/``nearest`` mode."""
    if mode in ROUTED and routes is None:
        raise ValueError(f"mode {mode!r} needs a source per document")
    rows = [(d, window) for d, doc in enumerate(docs) for window in _windows(doc, model.context)]
    parts: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[] for _ in docs]
    for lo in range(0, len(rows), batch_rows):
        chunk = rows[lo:lo + batch_rows]
        width = max(len(inp) for _, (inp, _) in chunk)
        tokens = torch.zeros(len(chunk), width, dtype=torch.int64)
        for i, (_, (inp, _)) in enumerate(chunk):
            tokens[i, : len(inp)] = torch.from_numpy(inp)
        sources = torch.tensor([routes[d] for d, _ in chunk]) if mode in ROUTED else None
        logp = torch.log_softmax(model.logits(tokens, mode, sources), dim=-1)
        p = logp.exp()
        mean = (p * logp).sum(-1)
        std = ((p * logp.square()).sum(-1) - mean.square()).clamp(min=0).sqrt()
        for i, (d, (_, labels)) in enumerate(chunk):
            n = len(labels)
            lab = torch.from_numpy(labels)
            parts[d].append((logp[i, :n].gather(1, lab[:, None])[:, 0].numpy(), mean[i, :n].numpy(),
                             std[i, :n].numpy()))
    return [TokenScores(*(np.concatenate([p[k] for p in part]) for k in range(3))) for part in parts]


def greedy_continuations(model: EvalModel, prefixes: Sequence[Sequence[int]], new_tokens: int, mode: str,
                         routes: Sequence[int] | None = None) -> list[list[int]]:
    """Greedy continuations of ``prefixes`` (all of one length), batched; the context slides past
    the model's length as in ``nulls generate``."""
    if not prefixes:
        return []
    ids = torch.tensor([list(p) for p in prefixes], dtype=torch.int64)
    sources = torch.tensor(list(routes)) if mode in ROUTED else None
    start = ids.shape[1]
    for _ in range(new_tokens):
        logits = model.logits(ids[:, -model.context:], mode, sources)[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids[:, start:].tolist()

"""Autoregressive generation from a NULLs GPT in one of the deployment modes (METHOD.md section 2).

Each step runs the whole context again (no KV cache: the models served this way on CPU are small,
and a full recompute keeps the code obviously equal to the training forward). The context is the
last ``seq_length`` tokens, the longest the model was trained on. Sampling is greedy at temperature
0, else softmax(logits / T) over the top-k logits, drawn from a seeded ``torch.Generator`` so that a
seed reproduces a sample exactly. Text is streamed as it is produced by decoding the whole sequence
again and printing what was added (sentencepiece joins pieces, drops the word-boundary mark and
assembles byte-fallback pieces into characters, so piece-by-piece decoding would print wrong text).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

MODES = ("route", "expected", "backbone")
_INCOMPLETE = "\ufffd"  # what sentencepiece decodes an unfinished UTF-8 byte sequence to


@dataclass(frozen=True)
class SamplingOptions:
    """How each next token is chosen; ``temperature`` 0 is greedy, ``top_k`` 0 keeps every token."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"--max-new-tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"--top-k must be >= 0, got {self.top_k}")


@dataclass(frozen=True)
class Routing:
    """Which sinks the forward pass uses: ``route`` to one source's, ``expected`` or ``backbone``."""

    mode: str = "route"
    source: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if (self.mode == "route") != (self.source is not None):
            raise ValueError("mode 'route' needs a source, and only it takes one")

    def forward_kwargs(self) -> dict:
        if self.mode == "route":
            return {"sink_mode": "route", "route_sources": int(self.source)}
        return {"sink_mode": self.mode}


@dataclass
class Generation:
    """The generated token ids (without the prompt or an end-of-sequence token) and timing."""

    tokens: list[int] = field(default_factory=list)
    stopped_at_eos: bool = False
    seconds: float = 0.0


def next_token_logits(model: torch.nn.Module, ids: Sequence[int], routing: Routing, context: int,
                      vocab_size: int) -> torch.Tensor:
    """float32 logits [vocab_size] for the token after ``ids`` (its last ``context`` tokens)."""
    tokens = torch.tensor([list(ids[-context:])], dtype=torch.int64)
    # One source for the whole window: the block-diagonal attention mask is then plain causal.
    source_ids = torch.full_like(tokens, routing.source if routing.source is not None else 0)
    logits = model(tokens, source_ids=source_ids, **routing.forward_kwargs())
    return logits[0, -1, :vocab_size].float()


def choose(logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator) -> int:
    """The next token: argmax when greedy, else a draw from the tempered, top-k-truncated softmax."""
    if options.temperature == 0:
        return int(torch.argmax(logits))
    scaled = logits / options.temperature
    if 0 < options.top_k < scaled.numel():
        kth = torch.topk(scaled, options.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, -torch.inf)
    probs = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def generate(model: torch.nn.Module, prompt: Sequence[int], routing: Routing, options: SamplingOptions, *,
             context: int, vocab_size: int, eos_id: int | None = None,
             on_token: Callable[[int], None] | None = None) -> Generation:
    """Sample up to ``options.max_new_tokens`` tokens after ``prompt``; stop early at ``eos_id``.

    ``on_token`` is called with every new token as soon as it is chosen (streaming).
    """
    if not prompt:
        raise ValueError("the prompt encodes to no tokens; give some text")
    generator = torch.Generator().manual_seed(options.seed)
    ids = list(prompt)
    out = Generation()
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for _ in range(options.max_new_tokens):
                token = choose(next_token_logits(model, ids, routing, context, vocab_size), options, generator)
                if eos_id is not None and token == eos_id:
                    out.stopped_at_eos = True
                    break
                ids.append(token)
                out.tokens.append(token)
                if on_token is not None:
                    on_token(token)
    finally:
        model.train(was_training)
    out.seconds = time.perf_counter() - start
    return out


class TextStream:
    """Turns generated ids into text increments that print correctly while generation runs.

    Decodes prompt + generated ids each time and emits the new suffix; holds it back while it ends
    in an unfinished UTF-8 sequence (byte-fallback pieces arrive one byte at a time).
    """

    def __init__(self, tokenizer, prompt: Sequence[int], write: Callable[[str], None]) -> None:
        self.tokenizer, self.write = tokenizer, write
        self.ids = list(prompt)
        self.shown = tokenizer.decode(self.ids)
        self.text = ""  # everything emitted

    def push(self, token: int) -> None:
        self.ids.append(int(token))
        self._emit(final=False)

    def finish(self) -> None:
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        full = self.tokenizer.decode(self.ids)
        if full.endswith(_INCOMPLETE) and not final:
            return
        # Decoding is prefix-stable once bytes are complete; were it not, what is printed stays printed.
        piece = full[len(self.shown):]
        if piece:
            self.write(piece)
            self.text += piece
        self.shown = full

"""Train or reuse the sentencepiece tokenizer, and encode documents to compact numpy token arrays.

Training follows the Llama recipe: identity normalisation (text is kept exactly, so
``decode(encode(text)) == text``), no whitespace collapsing, digits split, byte fallback (a character
outside the vocabulary becomes its UTF-8 bytes, never ``<unk>``). Newlines never occur in the training
lines, so a newline encodes as the byte piece ``<0x0A>``.

The model is trained from an in-memory iterator and written to memory: the model file then holds no
file path, and the same sample + config + ``num_threads`` give byte-identical models (sentencepiece's
result depends on its thread count, which is why that is a config field).
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict
from typing import Iterable, Iterator

import numpy as np
import sentencepiece as spm

from data_prep.config import TokenizerConfig

MAX_SENTENCE_BYTES = 1 << 14  # longer training lines are dropped by sentencepiece (rare: one paragraph)
_PROCESSORS: dict[str, spm.SentencePieceProcessor] = {}  # per Ray worker process, keyed by model sha256


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def training_lines(texts: Iterable[str], budget_chars: int) -> Iterator[str]:
    """Non-empty lines (paragraphs, headings) of ``texts`` until ``budget_chars`` characters are given."""
    used = 0
    for text in texts:
        for line in text.split("\n"):
            line = line.strip()
            if not line:
                continue
            yield line
            used += len(line)
            if used >= budget_chars:
                return


def train_tokenizer(lines: list[str], cfg: TokenizerConfig) -> bytes:
    """Train a sentencepiece model on ``lines`` and return the serialized model."""
    if not lines:
        raise ValueError("tokenizer: the training sample is empty (no input produced any document)")
    spm.set_random_generator_seed(cfg.seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model,
            vocab_size=cfg.vocab_size, model_type=cfg.model_type.value, byte_fallback=cfg.byte_fallback,
            character_coverage=cfg.character_coverage, split_digits=cfg.split_digits,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, num_threads=cfg.num_threads,
            input_sentence_size=0, shuffle_input_sentence=False, max_sentence_length=MAX_SENTENCE_BYTES,
            minloglevel=2,
        )
    except RuntimeError as err:
        if "vocab" in str(err).lower():
            raise ValueError(f"tokenizer.vocab_size: {cfg.vocab_size} does not fit the training sample "
                             f"({len(lines)} lines): {err}; lower it or raise tokenizer.sample_chars") from err
        raise
    return model.getvalue()


def tokenizer_card(model: bytes, cfg: TokenizerConfig, sample_sha: str | None, sample_chars: int | None) -> dict:
    """What ``tokenizer.json`` records next to ``tokenizer.model``: how it was made and its checksum."""
    sp = processor(model)
    settings = {k: (v.value if hasattr(v, "value") else v) for k, v in asdict(cfg).items() if k != "model_path"}
    return {
        "model_sha256": sha256(model),
        "vocab_size": sp.get_piece_size(),
        "token_dtype": token_dtype(sp.get_piece_size()).name,
        "trained": sample_sha is not None,
        "training": settings if sample_sha is not None else None,
        "sample_sha256": sample_sha,
        "sample_chars": sample_chars,
        "special_ids": {"unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id()},
    }


def card_json(card: dict) -> bytes:
    return (json.dumps(card, indent=2, sort_keys=True) + "\n").encode("utf-8")


def processor(model: bytes) -> spm.SentencePieceProcessor:
    """A loaded model, cached per process (a Ray worker encodes many chunks with one model)."""
    key = sha256(model)
    sp = _PROCESSORS.get(key)
    if sp is None:
        sp = spm.SentencePieceProcessor(model_proto=model)
        _PROCESSORS[key] = sp
    return sp


def encode_texts(sp: spm.SentencePieceProcessor, texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Encode documents in one C++ call: (all tokens concatenated, tokens per document)."""
    if not texts:
        return np.zeros(0, dtype=dtype), np.zeros(0, dtype=np.int64)
    ids = sp.encode(texts, num_threads=1, return_type="numpy")  # one core per Ray task
    lengths = np.fromiter((len(a) for a in ids), dtype=np.int64, count=len(ids))
    return np.concatenate(ids).astype(dtype, copy=False), lengths

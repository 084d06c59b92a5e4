"""A Hugging Face tokenizer folder behind the interface the system uses for sentencepiece.

Checkpoints imported from litgpt (``nulls import-litgpt``) were trained with a Hugging Face tokenizer
(SmolLM2's byte-level BPE), not with a sentencepiece model of our prep; its files are copied into
``<sources folder>/hf_tokenizer/``. Generation and the routing index call ``encode``, ``decode``,
``eos_id`` and ``get_piece_size`` (sentencepiece's names); this class answers them with
``transformers.AutoTokenizer``, offline. Like our sentencepiece encoding, ``encode`` adds no special
tokens.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

HF_TOKENIZER_DIR = "hf_tokenizer"
# What makes a folder a Hugging Face tokenizer (a fast tokenizer, or the config naming its class).
HF_TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json")


def is_hf_tokenizer_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in HF_TOKENIZER_MARKERS)


class HFTokenizer:
    """``transformers.AutoTokenizer.from_pretrained(path)`` (local files only) with sentencepiece's method names."""

    def __init__(self, path: str | os.PathLike) -> None:
        from transformers import AutoTokenizer

        self.path = Path(path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"{self.path}: not a Hugging Face tokenizer that loads offline ({e})") from None

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int] | Sequence[Sequence[int]]) -> str | list[str]:
        """Text of one id sequence, or a list of texts for a list of sequences (as sentencepiece)."""
        if len(ids) and not isinstance(ids[0], int):
            return [self.tokenizer.decode(list(seq)) for seq in ids]
        return self.tokenizer.decode(list(ids))

    def eos_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return -1 if eos is None else int(eos)

    def get_piece_size(self) -> int:
        return len(self.tokenizer)

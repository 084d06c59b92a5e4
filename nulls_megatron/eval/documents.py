"""The documents an evaluation scores: the forget set, a sample of retained sources, and holdout text.

Forget and retain documents come from the prep shards the checkpoint was trained on (the sources
manifest numbers them); holdout documents were never trained on: a JSONL file of ``{"text": ...}``
(optionally ``"title"``) encoded with the checkpoint's tokenizer, or another prep folder's shards.
Documents are cut to ``max_tokens`` tokens, as training may cut them (``train.max_document_tokens``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, TypeVar

import numpy as np

T = TypeVar("T")


@dataclass(frozen=True)
class Document:
    source: int  # source index in the checkpoint's manifest; -1 for holdout text
    title: str
    tokens: np.ndarray  # int64


@dataclass
class EvalSets:
    forget: list[Document]
    retain: list[Document]
    holdout: list[Document]

    def describe(self) -> str:
        return (f"{len(self.forget)} forget, {len(self.retain)} retained and {len(self.holdout)} holdout "
                "documents")


def prep_documents(prep_dir: Path, wanted: Callable[[int], bool] | None = None) -> list[Document]:
    """Every document of a prep folder's shards (in shard order) whose source ``wanted`` accepts."""
    from data_prep.shards import SHARD_DIR, SHARD_INDEX_NAME, read_shard

    index_path = prep_dir / SHARD_INDEX_NAME
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path}: no shard index; is {prep_dir} the output of `nulls prep`?")
    docs = []
    for shard in json.loads(index_path.read_text())["shards"]:
        for sample in read_shard(prep_dir / SHARD_DIR / shard["name"]):
            source = int(sample["meta"]["source_index"])
            if wanted is None or wanted(source):
                docs.append(Document(source, sample["meta"]["title"], sample["tokens"].astype(np.int64)))
    return docs


def jsonl_records(path: str | Path, parse: Callable[[dict], T], needs: str) -> list[T]:
    """``parse`` of every non-blank line of a JSONL file; a line that is not JSON, or that ``parse``
    rejects (KeyError, TypeError, ValueError), is an error naming the file, the line and ``needs``."""
    out = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(parse(json.loads(line)))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{path}:{number}: {needs} ({err})") from err
    if not out:
        raise ValueError(f"{path}: no records")
    return out


def jsonl_documents(path: Path, encode: Callable[[str], list[int]]) -> list[Document]:
    """Holdout documents from a JSONL file of ``{"text": ..., "title": ...}``."""
    def parse(record: dict) -> Document:
        text = record["text"]
        if not isinstance(text, str) or not text.strip():
            raise ValueError("\"text\" is empty or not a string")
        return Document(-1, str(record.get("title", "")), np.asarray(encode(text), dtype=np.int64))

    return jsonl_records(path, parse, "expected a JSON object with a non-empty \"text\" field")


def holdout_documents(data: str | Path, encode: Callable[[str], list[int]], tokenizer_sha256: str | None,
                      limit: int) -> list[Document]:
    """``data``: a JSONL file, or a prep folder (its tokenizer must be the checkpoint's)."""
    path = Path(data)
    if path.is_dir():
        card = path / "tokenizer.json"
        if tokenizer_sha256 and card.is_file():
            theirs = json.loads(card.read_text()).get("sha256")
            if theirs and theirs != tokenizer_sha256:
                raise ValueError(f"{path}: tokenized with another tokenizer (sha256 {theirs}, the model's is "
                                 f"{tokenizer_sha256}); pass the text as JSONL instead")
        docs = [Document(-1, d.title, d.tokens) for d in prep_documents(path)]
    elif path.is_file():
        docs = jsonl_documents(path, encode)
    else:
        raise FileNotFoundError(f"{path}: --holdout must be a JSONL file or a `nulls prep` folder")
    return docs[:limit]


def cut(docs: Iterable[Document], max_tokens: int) -> list[Document]:
    """Each document's first ``max_tokens`` tokens (0: whole); documents under 2 tokens have no label."""
    out = [Document(d.source, d.title, d.tokens[:max_tokens] if max_tokens else d.tokens) for d in docs]
    return [d for d in out if len(d.tokens) >= 2]


def sample_retain(docs: list[Document], forget: set[int], limit: int, seed: int) -> list[Document]:
    """Up to ``limit`` documents of sources outside ``forget``, a seeded draw (reproducible)."""
    pool = [d for d in docs if d.source not in forget]
    if len(pool) <= limit:
        return pool
    pick = np.random.default_rng(seed).choice(len(pool), size=limit, replace=False)
    return [pool[i] for i in sorted(pick)]

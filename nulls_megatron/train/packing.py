"""Pack documents into fixed-length rows with per-token source ids.

Documents are laid end to end in one stream and cut into rows of
``seq_length`` inputs; consecutive rows overlap by one token so that every
token except a document's first is a label exactly once. A document longer
than a row continues in the next row with the same source and document id.
The label of a document's last token would be the next document's first token:
that position gets ``loss_mask = 0`` (with block-diagonal attention the model
could not predict it anyway).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch

from ..sinks.routing import RoutingPlan


@dataclass
class PackedRows:
    """A batch of packed rows, every field [rows, seq_length]."""

    tokens: torch.Tensor
    labels: torch.Tensor
    source_ids: torch.Tensor
    document_ids: torch.Tensor
    loss_mask: torch.Tensor
    # The sink routing of these rows, planned ahead by the loader's thread (model.gpt.train_routing_plan):
    # the forward then neither groups tokens nor hashes sources. None: the model plans it itself.
    routing: RoutingPlan | None = None

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @staticmethod
    def stack(rows: list["PackedRows"]) -> "PackedRows":
        return PackedRows(*(torch.cat([getattr(r, f) for r in rows]) for f in TENSOR_FIELDS))


TENSOR_FIELDS = ("tokens", "labels", "source_ids", "document_ids", "loss_mask")


def pack_documents(
    documents: Iterable[tuple[int, np.ndarray]], seq_length: int, pad_token: int = 0
) -> Iterator[PackedRows]:
    """Yield one-row :class:`PackedRows` from ``(source_id, tokens)`` documents, in order.

    The final, partial row is padded with ``pad_token`` (loss_mask 0, a document id
    of its own). Documents with fewer than one token are skipped by the caller's
    reader, never here: an empty document raises, naming its position.
    """
    if seq_length < 2:
        raise ValueError(f"seq_length must be >= 2, got {seq_length}")
    width = seq_length + 1
    tokens = np.empty(width, dtype=np.int64)
    sources = np.empty(width, dtype=np.int64)
    docs = np.empty(width, dtype=np.int64)
    fill = 0
    doc_index = -1
    for doc_index, (source, doc_tokens) in enumerate(documents):
        doc_tokens = np.asarray(doc_tokens)
        if doc_tokens.ndim != 1 or doc_tokens.size == 0:
            raise ValueError(f"document {doc_index} (source {source}) has no tokens or is not 1-D: shape {doc_tokens.shape}")
        start = 0
        while start < doc_tokens.size:
            take = min(width - fill, doc_tokens.size - start)
            tokens[fill : fill + take] = doc_tokens[start : start + take]
            sources[fill : fill + take] = source
            docs[fill : fill + take] = doc_index
            fill += take
            start += take
            if fill == width:
                yield _row(tokens, sources, docs)
                # the last token of this row is the first input of the next
                tokens[0], sources[0], docs[0] = tokens[-1], sources[-1], docs[-1]
                fill = 1
    # fill == 1 means only the carried-over token is left: it was already a label.
    if fill > 1:
        tokens[fill:] = pad_token
        sources[fill:] = sources[fill - 1]
        docs[fill:] = doc_index + 1  # padding is a document of its own: nothing attends to it
        yield _row(tokens, sources, docs, valid_until=fill)


def _row(tokens: np.ndarray, sources: np.ndarray, docs: np.ndarray, valid_until: int | None = None) -> PackedRows:
    same_doc = docs[1:] == docs[:-1]
    if valid_until is not None:
        same_doc[valid_until - 1 :] = False  # labels that are padding
    as_row = lambda a: torch.from_numpy(a.copy()).unsqueeze(0)  # noqa: E731
    return PackedRows(
        tokens=as_row(tokens[:-1]),
        labels=as_row(tokens[1:]),
        source_ids=as_row(sources[:-1]),
        document_ids=as_row(docs[:-1]),
        loss_mask=as_row(same_doc.astype(np.float32)),
    )

"""Block-diagonal causal attention for packed rows (METHOD.md weakness 4).

A packed row holds several documents back to back. A token may attend only to
earlier tokens of its own document, so no information crosses a source
boundary: changing document A changes no logit of document B in the same row.
"""
from __future__ import annotations

import torch


def segment_ids(document_ids: torch.Tensor) -> torch.Tensor:
    """Number the contiguous runs of equal ids in each row: [b, s] -> [b, s] (0, 0, 1, 1, 1, 2, ...)."""
    change = torch.zeros_like(document_ids, dtype=torch.int64)
    change[:, 1:] = (document_ids[:, 1:] != document_ids[:, :-1]).to(torch.int64)
    return torch.cumsum(change, dim=1)


def block_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Megatron's boolean attention mask [b, 1, s, s] (True = may not attend).

    ``document_ids`` [b, s] marks which document each token belongs to; a new
    document starts wherever the id changes along the row (the source ids serve
    when each document is its own source).
    """
    if document_ids.dim() != 2:
        raise ValueError(f"document ids must be [batch, seq], got shape {tuple(document_ids.shape)}")
    seg = segment_ids(document_ids)
    seq = document_ids.shape[1]
    future = torch.triu(torch.ones(seq, seq, dtype=torch.bool, device=document_ids.device), diagonal=1)
    other_doc = seg.unsqueeze(2) != seg.unsqueeze(1)
    return (other_doc | future).unsqueeze(1)

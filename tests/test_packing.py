"""Packing documents into rows: every token a label once, documents continue across rows."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nulls_megatron.train.packing import PackedRows, pack_documents


def test_every_in_document_transition_is_a_label_exactly_once():
    rng = np.random.default_rng(0)
    docs = [(int(s), rng.integers(1, 1000, size=int(n))) for s, n in zip([5, 9, 9, 2, 77], [3, 40, 1, 17, 8])]
    seq = 8
    rows = PackedRows.stack(list(pack_documents(docs, seq)))
    assert rows.tokens.shape[1] == seq
    expected_pairs = [(int(a), int(b), s) for s, t in docs for a, b in zip(t[:-1], t[1:])]
    got = [
        (int(a), int(b), int(s))
        for a, b, s, m in zip(rows.tokens.flatten(), rows.labels.flatten(), rows.source_ids.flatten(), rows.loss_mask.flatten())
        if m > 0
    ]
    assert sorted(got) == sorted(expected_pairs)
    assert int(rows.loss_mask.sum()) == sum(len(t) - 1 for _, t in docs)


def test_long_document_continues_in_next_row_with_same_source_and_document():
    doc = np.arange(1, 21)
    rows = list(pack_documents([(42, doc)], seq_length=8))
    assert len(rows) == 3  # 19 labels over rows of 8
    for row in rows:
        assert torch.all(row.source_ids == 42)
    assert rows[1].tokens[0, 0] == rows[0].labels[0, -1]  # overlap of one token between rows
    assert torch.equal(rows[0].document_ids, rows[1].document_ids)
    last = rows[-1]
    assert last.loss_mask.sum() == 19 - 16 and last.tokens[0, 4:].eq(0).all()  # padding masked


def test_document_boundary_label_is_masked_and_documents_get_new_ids():
    rows = list(pack_documents([(1, np.array([10, 11, 12])), (2, np.array([20, 21, 22, 23]))], seq_length=16))
    (row,) = rows
    assert row.loss_mask[0, :2].tolist() == [1, 1] and row.loss_mask[0, 2] == 0  # 12 -> 20 crosses documents
    assert row.document_ids[0, :7].tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert row.source_ids[0, :7].tolist() == [1, 1, 1, 2, 2, 2, 2]
    assert row.loss_mask[0, 6:].sum() == 0  # padding never a label


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="document 1 \\(source 7\\) has no tokens"):
        list(pack_documents([(3, np.array([1, 2])), (7, np.array([], dtype=np.int64))], seq_length=4))
    with pytest.raises(ValueError, match="seq_length must be >= 2"):
        list(pack_documents([], seq_length=1))

"""The book case study (benchmarks/book_case_study.py) end to end in --quick mode: the five Sherlock
Holmes books prepped as one group among Wikipedia articles, the NULLs model and its oracle trained,
`nulls unlearn --group`, NPO, VerbMem, greedy extraction and the relearning attack; its RESULT line.
No number is asserted: the quick model is far too small to memorise a book. The exact-match count
is checked on a model that knows the text."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.data_required import require_shared_data

ROOT = Path(__file__).resolve().parents[1]
SHARED = require_shared_data()

NUM = r"(-?\d+(?:\.\d+)?|nan)"
RESULT = re.compile(r"RESULT " + " ".join(f"verbmem_{n}={NUM}" for n in ("before", "after", "oracle", "npo")) + " "
                    + " ".join(f"extract_{n}={NUM}" for n in ("before", "after", "oracle", "npo")) + " "
                    + " ".join(f"relearn_{n}=(\\d+)" for n in ("after", "oracle", "npo")))


class _Reciter:
    """An evaluation model that predicts a fixed text after its prefix (and token 0 past it)."""

    name, modes, context, vocab_size = "reciter", ("own",), 64, 50

    def __init__(self, text: list[int]) -> None:
        self.text = text

    def logits(self, tokens, mode, sources):
        out = torch.zeros(*tokens.shape, self.vocab_size)
        for b in range(tokens.shape[0]):
            for t in range(tokens.shape[1]):
                nxt = self.text[t + 1] if t + 1 < len(self.text) else 0
                out[b, t, nxt] = 1.0
        return out


def test_exact_match_length_counts_leading_equal_tokens():
    from benchmarks.book_case_study import exact_match_lengths
    # benchmarks/ stays off sys.path: its data_prep.py would shadow the data_prep package in
    # every process spawned later in the session.
    assert str(ROOT / "benchmarks") not in sys.path

    from nulls_megatron.eval.documents import Document

    text = list(range(1, 21))
    model = _Reciter(text)
    same = Document(0, "a", np.array(text, dtype=np.int64))
    changed = np.array(text, dtype=np.int64)
    changed[8] = 40  # the book differs from what the model recites at the 4th generated token
    lengths = exact_match_lengths(model, [same, Document(0, "b", changed)], prefix=5, new_tokens=10, mode="own",
                                  routes=[0, 0])
    assert lengths == [10, 3]


def test_book_case_study_quick(tmp_path):
    out = tmp_path / "book"
    cmd = [sys.executable, "-W", "ignore", str(ROOT / "benchmarks" / "book_case_study.py"), "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    last = proc.stdout.strip().splitlines()[-1]
    assert RESULT.fullmatch(last), proc.stdout[-2000:]

    study = json.loads((out / "book_study.json").read_text())
    plan, result = study["plan"], study["result"]
    assert len(plan["book_sources"]) == 2 and len(plan["book_titles"]) == 2  # quick: two of the five books
    assert any("Sign of the Four" in t for t in plan["book_titles"])
    oracle_cfg = (out / "configs" / "oracle.yaml").read_text()
    assert all(str(i) in oracle_cfg for i in plan["book_sources"]) and "exclude_sources" in oracle_cfg
    models = result["models"]
    assert set(models) == {"before", "after", "oracle", "npo"}
    assert [models[n]["mode"] for n in ("before", "after", "oracle", "npo")] == ["own", "nearest", "nearest", "own"]
    for name, row in models.items():
        assert len(row["exact_match"]) == 10 and all(0 <= n <= 8 for n in row["exact_match"])
        assert np.isfinite(row["passage_loss"]) and 0 <= row["verbmem"] <= 1
        if name != "before":
            assert len(row["relearn"]["curve"]) == 4  # the model as given, then one point per step
    # The unlearned version is a real `nulls unlearn` output with a receipt naming the group.
    receipts = list((out / "unlearned" / "receipts").glob("*.json"))
    assert len(receipts) == 1 and "sherlock_holmes" in receipts[0].read_text()
    for name in ("book_extraction.png", "book_relearn.png", "book_study.md"):
        assert (out / name).is_file(), name

    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.strip().splitlines()[-1] == last and "start:" not in again.stdout

"""`nulls eval`: the metrics against hand computations, and the command end to end on the session's trained
model with a real retrained oracle (the run config with the forget set excluded, trained by `nulls train`)."""
from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch

from nulls_megatron.cli import main
from nulls_megatron.eval import metrics
from nulls_megatron.eval.documents import Document, jsonl_documents
from nulls_megatron.eval.probes import build_probes, read_probes
from nulls_megatron.eval.scoring import TokenScores, token_scores
from tests.conftest import FORGET_GROUP, GROUP_SOURCES
from tests.train_helpers import read_articles


def test_memorisation_removed_gap_and_forget_quality():
    assert metrics.memorisation_removed(before=4.0, after=4.3, oracle=4.4) == pytest.approx(0.75)
    assert math.isnan(metrics.memorisation_removed(before=4.0, after=4.1, oracle=3.9))
    assert metrics.relative_gap(4.3, 4.4) == pytest.approx(-0.1 / 4.4)
    same = np.linspace(1, 2, 30)
    assert metrics.forget_quality(same, same) == pytest.approx(1.0)
    assert metrics.forget_quality(same, same + 5) < 1e-6


def test_auc_min_k_and_min_k_plus_plus_by_hand():
    # AUC by brute force over all pairs, ties counting half.
    members, others = [0.9, 0.5, 0.5, 0.1], [0.5, 0.2, 0.0]
    pairs = [(m > o) + 0.5 * (m == o) for m in members for o in others]
    assert metrics.auc(members, others) == pytest.approx(np.mean(pairs))
    s = TokenScores(logprob=np.array([-1.0, -5.0, -0.5, -3.0, -2.0]), mean=np.array([-1.0, -2.0, -1.0, -1.0, -2.0]),
                    std=np.array([1.0, 2.0, 0.5, 1.0, 1.0]))
    assert metrics.min_k(s, 0.4) == pytest.approx((-5.0 - 3.0) / 2)  # the 2 lowest of 5
    z = np.array([0.0, -1.5, 1.0, -2.0, 0.0])
    assert metrics.min_k_plus_plus(s, 0.4) == pytest.approx((-2.0 - 1.5) / 2)
    assert metrics.privleak(0.55, 0.5) == pytest.approx(10.0)
    assert sorted(z)[:2] == [-2.0, -1.5]


def test_truth_ratio_and_rouge():
    # true: 2 tokens of total log p -2 (mean -1); distractors: mean log p -2 and -0.5 per token.
    ratio = metrics.truth_ratio(-2.0, 2, [-4.0, -1.5], [2, 3])
    assert ratio == pytest.approx((math.exp(-2 + 1) + math.exp(-0.5 + 1)) / 2)
    assert metrics.rouge_l_f1(["the cat sat on the mat"], ["the cat sat on the mat"]) == [pytest.approx(1.0)]
    assert metrics.rouge_l_f1(["dogs bark"], ["the cat sat"]) == [pytest.approx(0.0)]


def test_probe_builder_tags_unique_and_shared_facts():
    forget = [Document(1, "Alpha Town", np.zeros(2, dtype=np.int64))]
    forget_text = ["Alpha Town was founded by settlers in 1823. The mayor of the town is Maria Gomez Ruiz today."]
    retain = ["Beta was settled in 1901 by farmers. Gamma grew after 1750 and 1688. The river flooded in 1822.",
              "Other settlers in the valley arrived in 1823 too.", "Its leader was John Smith Jones. Later the king was Carl Otto Berg."]
    probes = build_probes(forget, forget_text, retain, per_source=5, distractors=2, seed=0)
    by_answer = {p.answer: p for p in probes}
    assert by_answer["1823"].kind == "shared"  # "settlers ... 1823" also in a retained source
    assert by_answer["1823"].prompt == "Alpha Town. Alpha Town was founded by settlers in"
    assert set(by_answer["1823"].distractors) <= {"1901", "1750", "1688", "1822"}
    assert by_answer["Maria Gomez Ruiz"].kind == "unique"
    assert set(by_answer["Maria Gomez Ruiz"].distractors) == {"John Smith Jones", "Carl Otto Berg"}


def test_bad_input_files_name_the_line(tmp_path):
    path = tmp_path / "probes.jsonl"
    path.write_text('{"source": 1, "prompt": "p", "answer": "a", "distractors": ["b"]}\n{"source": 1}\n')
    with pytest.raises(ValueError, match=r"probes.jsonl:2: a probe needs"):
        read_probes(path)
    holdout = tmp_path / "holdout.jsonl"
    holdout.write_text('{"text": "fine"}\n\n{"title": "no text"}\n')
    with pytest.raises(ValueError, match=r"holdout.jsonl:3: expected a JSON object with a non-empty \"text\" field"):
        jsonl_documents(holdout, lambda t: [1, 2])


class _Counting:
    """A model whose logits are a fixed function of the last token, to check the windowing."""

    name, modes, context, vocab_size = "toy", ("backbone",), 4, 7

    def logits(self, tokens, mode, sources):
        table = torch.arange(7 * 7, dtype=torch.float32).reshape(7, 7).sin()
        return table[tokens]


def test_token_scores_windows_a_long_document_as_training_reads_it():
    doc = Document(0, "", np.array([1, 2, 3, 4, 5, 6, 0, 1, 2, 3], dtype=np.int64))  # 9 labels, context 4
    (scores,) = token_scores(_Counting(), [doc], "backbone", batch_rows=2)
    table = torch.log_softmax(torch.arange(49, dtype=torch.float32).reshape(7, 7).sin(), dim=-1)
    expected = [float(table[a, b]) for a, b in zip(doc.tokens[:-1], doc.tokens[1:])]
    np.testing.assert_allclose(scores.logprob, expected, rtol=1e-6)
    assert scores.loss == pytest.approx(-np.mean(expected))


@pytest.fixture(scope="module")
def oracle(trained_run, tmp_path_factory):
    """The retrained oracle: the run's config with the forget group excluded, trained by `nulls train`."""
    from nulls_megatron.eval.oracle import train_oracle

    ckpt = train_oracle(trained_run.checkpoint, list(GROUP_SOURCES), tmp_path_factory.mktemp("oracle"))
    return ckpt


def _holdout(tmp_path: Path) -> Path:
    path = tmp_path / "holdout.jsonl"
    path.write_text("".join(json.dumps({"text": a["text"], "title": a["title"]}) + "\n" for a in read_articles(120)[100:116]))
    return path


def test_eval_against_a_retrained_oracle_end_to_end(trained_run, oracle, tmp_path):
    state = json.loads((oracle / "train_state.json").read_text())
    assert state["loaders"][0]["skipped_documents"] >= len(GROUP_SOURCES)  # the oracle never read the forget set
    run = trained_run.copy_to(tmp_path)
    latest = (run.root / "latest").read_text()
    db = tmp_path / "mlflow.db"
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(run.run_dir), "--group", FORGET_GROUP, "--holdout", str(_holdout(tmp_path)),
                 "--oracle", str(oracle), "--out", str(out), "--tracking-uri", f"sqlite:///{db}",
                 "--verbmem-tokens", "24", "--retain-docs", "20", "--baselines", "ga,npo", "--baseline-steps", "3",
                 "--relearn-steps", "2", "--sustainability", "1,2"]) == 0
    assert (run.root / "latest").read_text() == latest  # the user's run is untouched: unlearned into OUT
    assert (out / "unlearned" / "receipts").is_dir()
    result = json.loads((out / "eval.json").read_text())
    assert result["sets"]["forget_sources"] == list(GROUP_SOURCES)
    losses, summary = result["losses"], result["summary"]
    assert set(summary) == {"own", "nearest", "backbone", "expected"}
    before = losses["before"]["own"]
    for mode, row in summary.items():
        after, oracle_loss = losses["after"][mode]["forget"], losses["oracle"][mode]["forget"]
        assert row["memorisation_removed"] == pytest.approx((after - before["forget"]) / (oracle_loss - before["forget"]))
        assert 0.0 <= row["forget_quality_p"] <= 1.0
        assert row["forget_minus_holdout"] == pytest.approx(after - losses["after"][mode]["holdout"])
    # Forgetting raises the forget loss; the oracle never saw those articles at all.
    assert losses["after"]["own"]["forget"] > before["forget"]
    assert losses["oracle"]["own"]["forget"] > before["forget"]
    for role in ("before", "after", "oracle"):
        assert 0.0 <= result["verbmem"][role] <= 1.0
        assert 0.0 <= result["privleak"][role]["auc_min_k_plus_plus"] <= 1.0
    assert "privleak_min_k_plus_plus" in result["privleak"]
    # The studies: post-hoc baselines raise the forget loss; relearning curves have one point per step.
    for name in ("nulls+ga", "nulls+npo"):
        assert result["baselines"]["losses"][name]["forget"] > before["forget"]
    curves = result["relearning"]["curves"]
    assert set(curves) == {"nulls", "oracle", "nulls+ga", "nulls+npo"} and all(len(c["curve"]) == 3 for c in curves.values())
    assert [r["forgotten"] for r in result["sustainability"]] == [0, 1, 2]
    assert (out / "relearning.png").is_file() and (out / "sustainability" / "sustainability.png").is_file()
    assert "## Relearning attack" in (out / "eval.md").read_text()
    assert (out / "losses.png").stat().st_size > 10_000 and "| backbone only |" in (out / "eval.md").read_text()
    with sqlite3.connect(db) as con:
        metrics_logged = {k for (k,) in con.execute("select key from metrics where run_uuid = ?", (result["mlflow_run_id"],))}
        artifacts = con.execute("select artifact_uri from runs where run_uuid = ?", (result["mlflow_run_id"],)).fetchone()[0]
    assert {"nearest/memorisation_removed", "verbmem/after", "privleak/privleak_min_k_plus_plus"} <= metrics_logged
    assert (Path(artifacts.removeprefix("file://")) / "eval.json").is_file()

    # The same unlearned model exported (routed) and evaluated through transformers gives the same losses.
    unlearned = out / "unlearned"
    assert main(["export", str(unlearned), str(tmp_path / "hf"), "--mode", "routed"]) == 0
    out2 = tmp_path / "eval_hf"
    assert main(["eval", "--model", str(tmp_path / "hf"), "--group", FORGET_GROUP, "--holdout", str(_holdout(tmp_path)),
                 "--before", str(run.checkpoint), "--out", str(out2), "--tracking-uri", f"sqlite:///{db}",
                 "--verbmem-docs", "2", "--verbmem-tokens", "8", "--retain-docs", "20", "--modes", "own,backbone"]) == 0
    hf = json.loads((out2 / "eval.json").read_text())
    for mode in ("own", "backbone"):
        for which in ("forget", "retain", "holdout"):
            assert hf["losses"]["after"][mode][which] == pytest.approx(losses["after"][mode][which], abs=1e-4)

"""The unlearning metrics, each from its source (docs/evaluation.md has the definitions).

- share of memorisation removed ``(F_after - F_before) / (F_oracle - F_before)`` and the relative gap
  ``(F_after - F_oracle) / F_oracle`` (METHOD.md section 6);
- VerbMem (MUSE, Shi et al. 2024): ROUGE-L F1 between a greedy continuation of a document's prefix
  and its true continuation, by the ``rouge-score`` package;
- Min-K% (Shi et al. 2023) and Min-K%++ (Zhang et al. 2024) membership scores, their AUC between
  forget and holdout documents, and PrivLeak (MUSE): ``(AUC_model - AUC_oracle) / AUC_oracle x 100``;
- forget quality (TOFU, Maini et al. 2024): the KS-test p-value between the model's and the oracle's
  per-document forget losses (scipy);
- Truth Ratio on cloze probes (the NULLs paper, after TOFU): mean over distractors of the
  length-normalised likelihood of the distractor over that of the true completion.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import stats

from .scoring import TokenScores


def memorisation_removed(before: float, after: float, oracle: float) -> float:
    """1.0 when unlearning moved the forget loss exactly to the oracle's, 0.0 when it did not move;
    NaN when the oracle is no worse than the model was (nothing was memorised to remove)."""
    gap = oracle - before
    return (after - before) / gap if gap > 0 else math.nan


def relative_gap(after: float, oracle: float) -> float:
    return (after - oracle) / oracle


def rouge_l_f1(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]


def min_k(scores: TokenScores, k: float = 0.2) -> float:
    """Min-K%: mean log p of the ``k`` fraction of tokens the model finds least likely (higher = member)."""
    n = max(1, int(math.ceil(len(scores.logprob) * k)))
    return float(np.sort(scores.logprob)[:n].mean())


def min_k_plus_plus(scores: TokenScores, k: float = 0.2) -> float:
    """Min-K%++: each token's log p standardised by the mean and std of log p under the model's own
    next-token distribution, then the mean of the lowest ``k`` fraction."""
    z = (scores.logprob - scores.mean) / np.maximum(scores.std, 1e-6)
    n = max(1, int(math.ceil(len(z) * k)))
    return float(np.sort(z)[:n].mean())


def auc(members: Sequence[float], non_members: Sequence[float]) -> float:
    """Probability that a member scores above a non-member (ties count half): the ROC AUC, from the
    Mann-Whitney U statistic."""
    if not len(members) or not len(non_members):
        return math.nan
    u = stats.mannwhitneyu(members, non_members, alternative="two-sided").statistic
    return float(u / (len(members) * len(non_members)))


def privleak(auc_model: float, auc_oracle: float) -> float:
    return (auc_model - auc_oracle) / auc_oracle * 100.0


def forget_quality(model_losses: Sequence[float], oracle_losses: Sequence[float]) -> float:
    """KS-test p-value: high when the two per-document loss distributions cannot be told apart."""
    return float(stats.ks_2samp(model_losses, oracle_losses).pvalue)


def truth_ratio(true_logprob: float, true_len: int, distractor_logprobs: Sequence[float],
                distractor_lens: Sequence[int]) -> float:
    """Mean over distractors of P(d)^(1/|d|) / P(true)^(1/|true|): below 1 the model prefers the truth;
    a model that knows nothing of the fact sits near 1."""
    t = true_logprob / max(true_len, 1)
    return float(np.mean([math.exp(lp / max(n, 1) - t) for lp, n in zip(distractor_logprobs, distractor_lens)]))

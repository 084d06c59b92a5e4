"""One evaluation: the model before and after forgetting, and the oracle, scored on the same documents.

The three models, each an :class:`~.scoring.EvalModel`:
- **after**: the model that forgot (``--model``; when the forget set is still live in a checkpoint of
  ours, ``nulls unlearn`` writes the forgetting version under OUT first: the user's run is untouched);
- **before**: the same step before unlearning (the version ``nulls unlearn`` started from, found beside
  it, or ``--before``);
- **oracle**: a model retrained without the forget set (``--oracle`` or ``--train-oracle``), scored
  with the forget sources' sinks off too, so that every mode means the same thing for both.

Losses are nats per token. ``own`` mode for holdout text (no source of its own) routes to the nearest
source. Every forget metric is also given against the same model's holdout loss (forget minus
holdout), which cancels differences in a model's overall quality.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

from . import metrics
from .documents import Document, EvalSets
from .probes import Probe, build_probes, read_probes
from .scoring import ROUTED, SINK_MODES, CheckpointModel, EvalModel, greedy_continuations, token_scores


@dataclass
class EvalOptions:
    modes: tuple[str, ...] = SINK_MODES
    max_tokens: int = 512  # documents are cut to this (the training cut when the run had one)
    retain_docs: int = 100
    holdout_docs: int = 100
    verbmem_docs: int = 50
    verbmem_prefix: int = 32
    verbmem_tokens: int = 128
    min_k: float = 0.2
    probes: str | None = None  # JSONL of cloze probes; built from the documents when absent
    probes_per_source: int = 5
    batch_rows: int = 8
    seed: int = 0


@dataclass
class EvalModels:
    after: EvalModel
    before: EvalModel | None = None
    oracle: EvalModel | None = None
    forget: list[int] = field(default_factory=list)


def _titles_or_openings(model: EvalModel, docs: Sequence[Document]) -> list[str]:
    return [d.title or model.decode(d.tokens[:128]) for d in docs]


def nearest_routes(index, model: EvalModel, docs: Sequence[Document], exclude: Sequence[int]) -> list[int]:
    """Each document's nearest surviving source by its title (the paper's Sink-Off routing)."""
    if not docs:
        return []
    return [int(s) for s in index.route_texts(_titles_or_openings(model, docs), exclude=exclude)[0]]


class _Scorer:
    """Scores each (model, mode, set) once and keeps the per-document results."""

    def __init__(self, sets: EvalSets, routes: Callable[[str, str], list[int] | None], options: EvalOptions):
        self.sets, self.routes, self.options = sets, routes, options
        self.cache: dict[tuple[str, str, str], list] = {}

    def scores(self, role: str, model: EvalModel, mode: str, which: str) -> list:
        key = (role, mode, which)
        if key not in self.cache:
            docs = getattr(self.sets, which)
            routes = self.routes(role, "nearest" if which == "holdout" and mode == "own" else mode, which)
            self.cache[key] = token_scores(model, docs, mode, routes, self.options.batch_rows)
        return self.cache[key]

    def loss(self, role: str, model: EvalModel, mode: str, which: str) -> float:
        scores = self.scores(role, model, mode, which)
        return float(np.mean([s.loss for s in scores])) if scores else math.nan


def verbmem(model: EvalModel, docs: Sequence[Document], mode: str, routes: Sequence[int] | None,
            options: EvalOptions) -> float:
    """Mean ROUGE-L F1 of greedy continuations of each document's prefix against its true text."""
    keep = [i for i, d in enumerate(docs) if len(d.tokens) > options.verbmem_prefix + 8][: options.verbmem_docs]
    if not keep:
        return math.nan
    prefixes = [docs[i].tokens[: options.verbmem_prefix].tolist() for i in keep]
    truths = [model.decode(docs[i].tokens[options.verbmem_prefix: options.verbmem_prefix + options.verbmem_tokens])
              for i in keep]
    outs = greedy_continuations(model, prefixes, options.verbmem_tokens, mode,
                                [routes[i] for i in keep] if routes is not None else None)
    return float(np.mean(metrics.rouge_l_f1([model.decode(o) for o in outs], truths)))


def probe_truth_ratios(model: EvalModel, probes: Sequence[Probe], mode: str, route_of: Callable[[int], int]) -> dict:
    """Mean Truth Ratio per probe kind (``unique``, ``shared``)."""
    import torch

    by_kind: dict[str, list[float]] = {}
    for probe in probes:
        prompt = model.encode(probe.prompt)
        values = []
        for option in [probe.answer, *probe.distractors]:
            full = model.encode(f"{probe.prompt} {option}")
            n = len(full) - len(prompt)  # the completion's tokens
            if full[: len(prompt)] != prompt or not 0 < n <= model.context:
                values = None  # the completion does not tokenize after the prompt's tokens: unscorable
                break
            full = full[-(model.context + 1):]
            sources = torch.tensor([route_of(probe.source)]) if mode in ROUTED else None
            logp = torch.log_softmax(model.logits(torch.tensor([full[:-1]]), mode, sources)[0], dim=-1)
            token_logp = logp.gather(1, torch.tensor(full[1:])[:, None])[:, 0][-n:]
            values.append((float(token_logp.sum()), n))
        if values:
            (t, tn), rest = values[0], values[1:]
            by_kind.setdefault(probe.kind, []).append(metrics.truth_ratio(t, tn, [v for v, _ in rest], [n for _, n in rest]))
    return {kind: {"mean": float(np.mean(v)), "probes": len(v)} for kind, v in sorted(by_kind.items())}


def evaluate(models: EvalModels, sets: EvalSets, index, options: EvalOptions,
             texts: Callable[[Sequence[Document]], list[str]], say: Callable[[str], None] = print) -> dict:
    """Every metric of docs/evaluation.md for ``models`` on ``sets``; returns the result dict."""
    start = time.perf_counter()
    forget = models.forget
    roles = {"after": models.after, "before": models.before, "oracle": models.oracle}
    roles = {k: v for k, v in roles.items() if v is not None}
    off = {"after": sorted(set(getattr(models.after, "off_sources", [])) | set(forget)), "before": [],
           "oracle": sorted(forget)}
    route_cache: dict[tuple[str, str], list[int]] = {}

    def routes(role: str, mode: str, which: str) -> list[int] | None:
        if mode not in ROUTED:
            return None
        docs = getattr(sets, which)
        if mode == "own":
            return [d.source for d in docs]
        if (role, which) not in route_cache:
            route_cache[role, which] = nearest_routes(index, roles[role], docs, off[role])
        return route_cache[role, which]

    scorer = _Scorer(sets, routes, options)
    modes = {role: [m for m in options.modes if m in model.modes] for role, model in roles.items()}
    modes["before"] = [m for m in modes.get("before", []) if m == "own"] or modes.get("before", [])[:1]
    losses: dict[str, dict[str, dict[str, float]]] = {}
    def as_scored(role: str):
        """The oracle with the forget sources' sinks off (in memory), every other model as it is."""
        model = roles[role]
        return model.sources_disabled(forget) if role == "oracle" and isinstance(model, CheckpointModel) else nullcontext()

    for role, model in roles.items():
        with as_scored(role):
            for mode in modes[role]:
                say(f"eval: scoring {role} in {mode} mode")
                losses.setdefault(role, {})[mode] = {w: scorer.loss(role, model, mode, w) for w in ("forget", "retain", "holdout")}
    result: dict = {"options": asdict(options), "sets": {"forget_sources": forget, "forget_docs": len(sets.forget),
                    "retain_docs": len(sets.retain), "holdout_docs": len(sets.holdout)}, "losses": losses}

    before_own = losses.get("before", {}).get("own", {})
    summary: dict[str, dict[str, float]] = {}
    for mode, after in losses["after"].items():
        row = {"forget": after["forget"], "retain": after["retain"], "holdout": after["holdout"],
               "forget_minus_holdout": after["forget"] - after["holdout"]}
        oracle = losses.get("oracle", {}).get(mode)
        if oracle:
            row["oracle_forget"] = oracle["forget"]
            row["oracle_forget_minus_holdout"] = oracle["forget"] - oracle["holdout"]
            row["gap_to_oracle"] = metrics.relative_gap(after["forget"], oracle["forget"])
            a = scorer.scores("after", models.after, mode, "forget")
            o = scorer.scores("oracle", models.oracle, mode, "forget")
            row["forget_quality_p"] = metrics.forget_quality([s.loss for s in a], [s.loss for s in o])
        if before_own:
            row["retain_shift"] = (after["retain"] - before_own["retain"]) / before_own["retain"]
            row["holdout_shift"] = (after["holdout"] - before_own["holdout"]) / before_own["holdout"]
            if oracle:
                row["memorisation_removed"] = metrics.memorisation_removed(before_own["forget"], after["forget"], oracle["forget"])
                row["memorisation_removed_vs_holdout"] = metrics.memorisation_removed(
                    before_own["forget"] - before_own["holdout"], row["forget_minus_holdout"],
                    row["oracle_forget_minus_holdout"])
        summary[mode] = row
    result["summary"] = summary

    sink_off = "nearest" if "nearest" in modes["after"] else modes["after"][0]
    result["sink_off_mode"] = sink_off
    say(f"eval: VerbMem ({options.verbmem_tokens}-token greedy continuations)")
    vm = {}
    for role, model in roles.items():
        mode = "own" if role == "before" else (sink_off if sink_off in modes[role] else modes[role][0])
        with as_scored(role):
            vm[role] = verbmem(model, sets.forget, mode, routes(role, mode, "forget"), options)
    result["verbmem"] = vm

    leak = {}
    for role in roles:
        mode = "own" if role == "before" else sink_off
        if mode not in modes[role]:
            continue
        f = scorer.scores(role, roles[role], mode, "forget")
        h = scorer.scores(role, roles[role], mode, "holdout")
        leak[role] = {"auc_min_k": metrics.auc([metrics.min_k(s, options.min_k) for s in f],
                                                [metrics.min_k(s, options.min_k) for s in h]),
                      "auc_min_k_plus_plus": metrics.auc([metrics.min_k_plus_plus(s, options.min_k) for s in f],
                                                          [metrics.min_k_plus_plus(s, options.min_k) for s in h])}
    if "oracle" in leak and "after" in leak:
        for score in ("auc_min_k", "auc_min_k_plus_plus"):
            leak[f"privleak_{score[4:]}"] = metrics.privleak(leak["after"][score], leak["oracle"][score])
    result["privleak"] = leak

    probes = read_probes(options.probes) if options.probes else build_probes(
        sets.forget, texts(sets.forget), texts(sets.retain), options.probes_per_source, seed=options.seed)
    probes = [p for p in probes if p.source in set(forget)]
    say(f"eval: Truth Ratio on {len(probes)} cloze probes")
    tr = {}
    for role, model in roles.items():
        mode = "own" if role == "before" else sink_off
        nearest = dict(zip([d.source for d in sets.forget], routes(role, "nearest", "forget") or [])) \
            if "nearest" in model.modes else {}
        route_of = (lambda s: s) if mode == "own" else (lambda s: nearest.get(s, s))
        with as_scored(role):
            tr[role] = probe_truth_ratios(model, probes, mode, route_of)
    result["truth_ratio"] = {"probes": len(probes), "by_model": tr,
                             "kinds": {k: sum(p.kind == k for p in probes) for k in ("unique", "shared")}}
    result["seconds"] = time.perf_counter() - start
    return result

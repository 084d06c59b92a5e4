"""Sustainability: what repeated forgetting costs the sources that stay (METHOD.md section 4, item 5).

Sources share the sink pool, so every erased source zeroes rows that retained sources also own;
after ``n`` erasures about ``1 - (1 - k / n_pool)^n`` of the pool is gone. This module forgets 1,
then 10, then 100 sources in total (sizes configurable, capped at the sources the model has outside
the retained sample), each step one ``nulls unlearn`` (``run_unlearn``) on the previous step's
version, every version written under ``out`` (the user's run is never touched), and after each
step measures the retained-source loss (``own`` mode, a fixed seeded sample of retained documents)
and the zeroed fraction of the pool (disabled rows / n_pool in the loaded sink tables).

Which sources are forgotten is a seeded permutation of the candidates, so a rerun forgets the same
ones, and a step whose version already exists under ``out`` (with those sources erased) is reused.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .baselines import mean_loss
from .documents import Document, cut, prep_documents, sample_retain
from .scoring import CheckpointModel

SIZES = (1, 10, 100)
RETAIN_DOCS = 32
TABLE_NAME = "sustainability.json"
PLOT_NAME = "sustainability.png"


@dataclass
class SustainabilityStep:
    forgotten: int  # sources erased in total
    checkpoint: str
    retained_loss: float
    zeroed_fraction: float


@dataclass
class Sustainability:
    steps: list[SustainabilityStep]
    table: Path
    plot: Path


def zeroed_fraction(model: CheckpointModel) -> float:
    """Disabled pool rows / n_pool, averaged over layers (equal in every layer unless sinks are per layer)."""
    tables = [mlp.sinks for mlp in model.loaded.model.nulls_mlps()]
    return float(np.mean([t.disabled.float().mean().item() for t in tables]))


def forget_order(n_sources: int, keep: set[int], seed: int) -> list[int]:
    """Every source outside ``keep``, in a seeded random order."""
    candidates = np.array(sorted(set(range(n_sources)) - keep), dtype=np.int64)
    return candidates[np.random.default_rng(seed).permutation(len(candidates))].tolist()


def capped_sizes(sizes: Sequence[int], available: int) -> list[int]:
    """Increasing totals, each capped at ``available`` (repeats dropped)."""
    out: list[int] = []
    for size in sorted(int(s) for s in sizes):
        if size < 1:
            raise ValueError(f"sustainability sizes must be >= 1, got {size}")
        if min(size, available) not in out:
            out.append(min(size, available))
    return out


def _erased(checkpoint: Path) -> set[int]:
    from ..routing.build import checkpoint_sources

    return set(checkpoint_sources(checkpoint).state.disabled_sources)


def sustainability(checkpoint: str | Path, out: str | Path, sizes: Sequence[int] = SIZES,
                   retain: Sequence[Document] | None = None, retain_docs: int = RETAIN_DOCS, seed: int = 0,
                   say: Callable[[str], None] = print) -> Sustainability:
    """Forget ``sizes`` sources in total, in sequence, through ``run_unlearn`` on ``checkpoint``;
    the table (JSON) and plot (PNG) go to ``out``. ``retain``: the retained documents to measure
    (default: ``retain_docs`` documents drawn with ``seed`` from the checkpoint's prep shards, cut
    as training cut them); their sources are never forgotten."""
    from ..inference.load import checkpoint_config
    from ..routing.build import checkpoint_sources
    from ..unlearn.requests import Request
    from ..unlearn.service import run_unlearn

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sources = checkpoint_sources(checkpoint)
    already = set(sources.state.off_sources())
    if retain is None:
        max_tokens = checkpoint_config(sources.checkpoint).train.max_document_tokens
        retain = sample_retain(cut(prep_documents(sources.prep_dir), max_tokens), already, retain_docs, seed)
    if not retain:
        raise ValueError(f"{sources.checkpoint}: no retained documents to measure")
    order = forget_order(sources.n_sources, already | {d.source for d in retain}, seed)
    if not order:
        raise ValueError(f"{sources.checkpoint}: every source is retained or already off; nothing to forget")
    steps = [_measure(sources.checkpoint, 0, retain)]
    current, done = sources.checkpoint, 0
    for total in capped_sizes(sizes, len(order)):
        version = out / f"forgot-{total:06d}"
        wanted = set(order[:total])
        if version.exists():
            if not wanted <= _erased(version):
                raise ValueError(f"{version}: exists but does not have the {total} sources of this run erased; "
                                 "remove it or pass another --out")
            say(f"sustainability: reusing {version}")
        else:
            say(f"sustainability: forgetting {total - done} more source(s) ({total} in all) -> {version}")
            run_unlearn(current, [Request("index", str(s), "eval") for s in order[done:total]], out=version, say=say)
        steps.append(_measure(version, total, retain))
        current, done = version, total
    table, plot = out / TABLE_NAME, out / PLOT_NAME
    table.write_text(json.dumps([asdict(s) for s in steps], indent=1) + "\n")
    write_plot(steps, plot)
    return Sustainability(steps, table, plot)


def _measure(checkpoint: Path, forgotten: int, retain: Sequence[Document]) -> SustainabilityStep:
    model = CheckpointModel(checkpoint)
    return SustainabilityStep(forgotten, str(checkpoint), mean_loss(model, retain, "own"), zeroed_fraction(model))


def write_plot(steps: Sequence[SustainabilityStep], path: Path) -> None:
    """Retained loss and zeroed pool fraction against the number of sources forgotten (Agg, no pyplot
    state: safe in any process)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.5), layout="constrained")
    n = [s.forgotten for s in steps]
    for ax, values, label in zip(fig.subplots(1, 2), ([s.retained_loss for s in steps], [s.zeroed_fraction for s in steps]),
                                 ("retained-source loss (nats/token)", "zeroed fraction of the sink pool")):
        ax.plot(n, values, marker="o")
        ax.set_xlabel("sources forgotten")
        ax.set_ylabel(label)
        if max(n) >= 10:
            ax.set_xscale("symlog", linthresh=1)
        ax.ticklabel_format(axis="y", useOffset=False)  # the loss moves little: show it, not an offset
        ax.grid(alpha=0.3)
    fig.suptitle("Sustainability: forgetting in sequence")
    fig.savefig(path, dpi=120)

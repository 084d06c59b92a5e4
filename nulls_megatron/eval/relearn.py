"""The relearning attack (the NULLs paper's book case study; MUSE's and Lynch et al.'s "relearning"):
does a little fine-tuning on text of a forgotten source bring the rest of it back?

Each forgotten document is split into halves. A private copy of the model is fine-tuned (every
parameter, the run's AdamW at a constant rate: baselines.fine_tune) on the first halves, in the mode
the model is deployed in (``nearest`` routing, the paper's Sink-Off, or ``backbone``), and after every
step the mean loss on the second halves is measured in that mode. Post-hoc unlearning (GA, NPO) only
hides what the weights still hold, so it comes back in a few steps; forgetting by sinks removes the
weights, so the model should relearn as slowly as a model that never saw the text (the oracle).

The number reported is the steps until the model is halfway back from its unlearned loss ``after``
(the curve's start) to its pre-unlearning loss ``before``: the first step whose loss is at most
``after - 0.5 * (after - before)``; None when the curve never gets there.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

from .baselines import BATCH_ROWS, document_routes, fine_tune, mean_loss, token_nll, training_rows
from .documents import Document
from .scoring import CheckpointModel

STEPS = 30
HALFWAY = 0.5


@dataclass
class RelearnResult:
    """``curve[i]``: mean second-half loss after ``i`` steps (``curve[0]`` is the model as given, so
    one point per step after it)."""

    model: str
    mode: str
    lr: float
    before: float
    curve: list[float]
    steps_to_halfway: int | None

    @property
    def after(self) -> float:
        return self.curve[0]

    @property
    def target(self) -> float:
        return halfway_target(self.before, self.after)

    def to_json(self) -> dict:
        return {**asdict(self), "after": self.after, "target": self.target}


def halfway_target(before: float, after: float, fraction: float = HALFWAY) -> float:
    return after - fraction * (after - before)


def halfway_step(curve: Sequence[float], before: float, fraction: float = HALFWAY) -> int | None:
    """First index ``i`` with ``curve[i] <= after - fraction * (after - before)``, ``after = curve[0]``
    (0 when the model was never above it); None when the curve never reaches it."""
    target = halfway_target(before, curve[0], fraction)
    return next((i for i, loss in enumerate(curve) if loss <= target), None)


def best_recovery(curve: Sequence[float], before: float) -> float:
    """The largest share of the unlearning that the relearning attack undid at any step:
    ``(curve[0] - min(curve)) / (curve[0] - before)``. Unlike the halfway step, it does not depend on
    the attack getting halfway before fine-tuning on the first halves starts to overfit them (the
    second-half loss then rises again); NaN when unlearning raised nothing to undo."""
    gap = curve[0] - before
    return (curve[0] - min(curve)) / gap if gap > 0 else math.nan


def split_halves(docs: Sequence[Document]) -> tuple[list[Document], list[Document]]:
    """Each document's first and second half of its tokens (documents under 4 tokens are dropped:
    a half needs a label)."""
    docs = [d for d in docs if len(d.tokens) >= 4]
    if not docs:
        raise ValueError("no forget document has 4 tokens or more to split")
    mid = [len(d.tokens) // 2 for d in docs]
    return ([Document(d.source, d.title, d.tokens[:m]) for d, m in zip(docs, mid)],
            [Document(d.source, d.title, d.tokens[m:]) for d, m in zip(docs, mid)])


def relearn(model: CheckpointModel, forget: Sequence[Document], before: float, *, mode: str = "nearest",
            routes: Sequence[int] | None = None, steps: int = STEPS, lr: float | None = None,
            batch_rows: int = BATCH_ROWS, seed: int = 0) -> RelearnResult:
    """The relearning attack on ``model`` (after ``nulls unlearn``, the oracle, or a GA/NPO model)
    with the ``forget`` documents; ``model`` itself is not changed.

    ``before``: the pre-unlearning model's loss on the second halves in the same mode (the
    ``mean_loss`` of ``split_halves(forget)[1]``). ``routes``: the source each forget document is
    routed to (required for ``nearest``; ``own`` defaults to the document's source). ``lr``: default
    the run's ``optimizer.min_lr``. For an oracle, call inside ``oracle.sources_disabled(forget
    sources)`` to attack it with the forgotten rows off, as the unlearned model has them."""
    kept = [(d, r) for d, r in zip(forget, document_routes(forget, mode, routes)) if len(d.tokens) >= 4]
    first, second = split_halves([d for d, _ in kept])
    routes = [r for _, r in kept]
    rows = training_rows(first, model.context, routes)
    curve = [mean_loss(model, second, mode, routes)]

    def loss_fn(tuned: CheckpointModel, picked: list[int]):
        nll, real = token_nll(tuned, [rows[i] for i in picked], mode)
        return nll.sum() / real.sum()

    def measure(step: int, tuned: CheckpointModel) -> None:
        curve.append(mean_loss(tuned, second, mode, routes))

    lr = model.loaded.cfg.optimizer.min_lr if lr is None else lr
    fine_tune(model, len(rows), loss_fn, steps=steps, lr=lr, batch_rows=batch_rows, seed=seed,
              name=f"{model.name} relearned", after_step=measure)
    if not all(math.isfinite(x) for x in curve):
        raise FloatingPointError(f"{model.name}: the relearning loss became non-finite: {curve}")
    return RelearnResult(model.name, mode, lr, float(before), curve, halfway_step(curve, before))

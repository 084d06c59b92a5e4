"""The studies ``nulls eval`` adds on request: post-hoc baselines (GA, NPO), the relearning attack
and sustainability. Each takes the evaluation's models and documents, adds its part to the result
and returns the plots it wrote."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from .baselines import mean_loss, unlearn_posthoc
from .documents import EvalSets
from .evaluate import EvalModels, nearest_routes
from .relearn import relearn, split_halves
from .scoring import CheckpointModel, open_model
from .sustainability import sustainability

Study = Callable[[EvalModels, EvalSets, dict], list[Path]]


def _checkpoint(model, role: str) -> CheckpointModel:
    if not isinstance(model, CheckpointModel):
        raise ValueError(f"the {role} model must be a checkpoint of ours for this study (a `nulls export` "
                         "folder cannot be fine-tuned here)")
    return model


def baselines_and_relearning(methods: Sequence[str], relearn_steps: int, index, dense: str | None = None,
                             steps: int = 20, say: Callable[[str], None] = print) -> Study:
    """GA/NPO on the NULLs model before unlearning (and on ``dense``, the standard transformer of the
    same active size), scored like the others; then the relearning attack on the unlearned NULLs
    model (Sink-Off routing), the oracle (same routing, forget rows off) and every baseline (own)."""

    def study(models: EvalModels, sets: EvalSets, result: dict) -> list[Path]:
        before = _checkpoint(models.before, "before")
        after = _checkpoint(models.after, "after")
        forget_sources = models.forget
        retained = set(forget_sources)
        off = sorted(set(after.off_sources) | retained)
        routes = nearest_routes(index, after, sets.forget, off)
        posthoc: dict[str, CheckpointModel] = {}
        table = {}
        bases = [("nulls", before)] + ([("dense", open_model(dense, name="dense"))] if dense else [])
        for base_name, base in bases:
            for method in methods:
                say(f"eval: {method.upper()} on the {base_name} model ({steps} steps)")
                tuned = unlearn_posthoc(base, sets.forget, method, steps=steps, retain=sets.retain[:16])
                name = f"{base_name}+{method}"
                posthoc[name] = tuned
                table[name] = {w: mean_loss(tuned, getattr(sets, w), "own" if w != "holdout" else "backbone")
                               for w in ("forget", "retain", "holdout")}
        if table:
            result["baselines"] = {"steps": steps, "losses": table,
                                   "note": "holdout loss in backbone mode (holdout text has no source)"}
        if relearn_steps > 0:
            second = split_halves(sets.forget)[1]
            kept_routes = [r for d, r in zip(sets.forget, routes) if len(d.tokens) >= 4]
            target_before = mean_loss(before, second, "own", [d.source for d in second])
            curves = {}
            say(f"eval: relearning attack ({relearn_steps} steps) on the unlearned model")
            curves["nulls"] = relearn(after, sets.forget, target_before, mode="nearest", routes=routes,
                                      steps=relearn_steps).to_json()
            if models.oracle is not None and isinstance(models.oracle, CheckpointModel):
                oracle_routes = nearest_routes(index, models.oracle, sets.forget, sorted(retained))
                with models.oracle.sources_disabled(forget_sources):
                    say("eval: relearning attack on the oracle")
                    curves["oracle"] = relearn(models.oracle, sets.forget, target_before, mode="nearest",
                                               routes=oracle_routes, steps=relearn_steps).to_json()
            for name, tuned in posthoc.items():
                say(f"eval: relearning attack on {name}")
                curves[name] = relearn(tuned, sets.forget, target_before, mode="own", steps=relearn_steps).to_json()
            result["relearning"] = {"before_second_half_loss": target_before, "routes": kept_routes,
                                    "curves": curves}
            return [_plot_relearning(curves, target_before, result)]
        return []

    return study


def _plot_relearning(curves: dict, before: float, result: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    for name, curve in curves.items():
        ax.plot(range(len(curve["curve"])), curve["curve"], marker=".", label=name)
    ax.axhline(before, color="k", linestyle="--", linewidth=1, label="before unlearning")
    ax.set_xlabel("fine-tuning steps on the first halves")
    ax.set_ylabel("second-half loss (nats/token)")
    ax.set_title("relearning attack")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(result["out"]) / "relearning.png"
    fig.savefig(path, dpi=110)
    return path


def sustainability_study(sizes: Sequence[int], say: Callable[[str], None] = print) -> Study:
    """Forget ``sizes`` sources in sequence from the model before unlearning (into OUT/sustainability)."""

    def study(models: EvalModels, sets: EvalSets, result: dict) -> list[Path]:
        before = _checkpoint(models.before, "before")
        out = Path(result["out"]) / "sustainability"
        done = sustainability(before.loaded.checkpoint, out, sizes, retain=sets.retain, say=say)
        result["sustainability"] = [{"forgotten": s.forgotten, "retained_loss": s.retained_loss,
                                     "zeroed_fraction": s.zeroed_fraction} for s in done.steps]
        return [done.plot]

    return study

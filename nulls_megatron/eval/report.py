"""An evaluation's results as people read them: ``eval.json``, a markdown table, PNG plots, MLflow."""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..checkpoint.atomic import atomic_file
from ..mlflow_store import artifact_location, default_tracking_uri, store_lock

MODE_NAMES = {"own": "own sinks", "nearest": "nearest surviving source (Sink-Off)", "backbone": "backbone only",
              "expected": "expected"}


def _f(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def markdown(result: dict) -> str:
    lines = ["# Unlearning evaluation", "",
             f"Forget set: {len(result['sets']['forget_sources'])} sources ({result['sets']['forget_docs']} documents); "
             f"{result['sets']['retain_docs']} retained and {result['sets']['holdout_docs']} holdout documents. "
             "Losses in nats per token.", ""]
    before = result["losses"].get("before", {}).get("own")
    if before:
        lines += [f"Before unlearning (own sinks): forget {_f(before['forget'])}, retain {_f(before['retain'])}, "
                  f"holdout {_f(before['holdout'])}.", ""]
    lines += ["| mode | forget | oracle forget | memorisation removed | gap to oracle | retain shift | holdout shift "
              "| forget - holdout | oracle forget - holdout | forget quality p |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for mode, row in result["summary"].items():
        lines.append(
            f"| {MODE_NAMES.get(mode, mode)} | {_f(row['forget'])} | {_f(row.get('oracle_forget'))} "
            f"| {_f(row.get('memorisation_removed'), 2)} | {_f(row.get('gap_to_oracle') and 100 * row['gap_to_oracle'], 1)}% "
            f"| {_f(row.get('retain_shift') and 100 * row['retain_shift'], 2)}% "
            f"| {_f(row.get('holdout_shift') and 100 * row['holdout_shift'], 2)}% | {_f(row['forget_minus_holdout'])} "
            f"| {_f(row.get('oracle_forget_minus_holdout'))} | {_f(row.get('forget_quality_p'), 3)} |")
    lines += ["", f"Sink-Off mode for the rows below: {result['sink_off_mode']}.", "",
              "| model | VerbMem (ROUGE-L F1) | Min-K% AUC | Min-K%++ AUC | Truth Ratio unique | Truth Ratio shared |",
              "|---|---|---|---|---|---|"]
    for role in ("before", "after", "oracle"):
        if role not in result["verbmem"]:
            continue
        leak = result["privleak"].get(role, {})
        tr = result["truth_ratio"]["by_model"].get(role, {})
        lines.append(f"| {role} | {_f(result['verbmem'][role])} | {_f(leak.get('auc_min_k'))} "
                     f"| {_f(leak.get('auc_min_k_plus_plus'))} | {_f(tr.get('unique', {}).get('mean'))} "
                     f"| {_f(tr.get('shared', {}).get('mean'))} |")
    leak = result["privleak"]
    if "privleak_min_k" in leak:
        lines += ["", f"PrivLeak (vs the oracle): Min-K% {_f(leak['privleak_min_k'], 1)}, "
                      f"Min-K%++ {_f(leak['privleak_min_k_plus_plus'], 1)} (0 = the oracle's; |PrivLeak| <= 10 is the goal)."]
    kinds = result["truth_ratio"]["kinds"]
    lines += ["", f"Truth Ratio over {result['truth_ratio']['probes']} cloze probes ({kinds['unique']} unique, "
                  f"{kinds['shared']} shared): below 1 the model prefers the true completion."]
    if "baselines" in result:
        lines += ["", f"## Post-hoc baselines ({result['baselines']['steps']} steps)", "",
                  "| model | forget | retain | holdout (backbone) |", "|---|---|---|---|"]
        lines += [f"| {name} | {_f(v['forget'])} | {_f(v['retain'])} | {_f(v['holdout'])} |"
                  for name, v in result["baselines"]["losses"].items()]
    if "relearning" in result:
        rel = result["relearning"]
        lines += ["", "## Relearning attack", "",
                  f"Second-half loss before unlearning: {_f(rel['before_second_half_loss'])}.", "",
                  "| model | mode | start | after last step | steps to halfway back |", "|---|---|---|---|---|"]
        for name, c in rel["curves"].items():
            steps = c["steps_to_halfway"]
            reached = str(steps) if steps is not None else f"not within {len(c['curve']) - 1}"
            lines.append(f"| {name} | {c['mode']} | {_f(c['curve'][0])} | {_f(c['curve'][-1])} | {reached} |")
    if "sustainability" in result:
        lines += ["", "## Sustainability", "", "| sources forgotten | retained loss | pool zeroed |", "|---|---|---|"]
        lines += [f"| {r['forgotten']} | {_f(r['retained_loss'])} | {100 * r['zeroed_fraction']:.1f}% |"
                  for r in result["sustainability"]]
    return "\n".join(lines) + "\n"


def plot_losses(result: dict, path: Path) -> Path:
    """Forget / retain / holdout loss per mode for after vs oracle, with the before level as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(result["summary"])
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharey=False)
    before = result["losses"].get("before", {}).get("own", {})
    for ax, which in zip(axes, ("forget", "retain", "holdout")):
        after = [result["losses"]["after"][m][which] for m in modes]
        oracle = [result["losses"].get("oracle", {}).get(m, {}).get(which, math.nan) for m in modes]
        x = range(len(modes))
        ax.bar([i - 0.2 for i in x], after, width=0.4, label="after unlearning")
        ax.bar([i + 0.2 for i in x], oracle, width=0.4, label="retrained oracle")
        if which in before:
            ax.axhline(before[which], color="k", linestyle="--", linewidth=1, label="before")
        ax.set_xticks(list(x), modes)
        ax.set_title(f"{which} loss (nats/token)")
        values = [v for v in after + oracle + [before.get(which, math.nan)] if not math.isnan(v)]
        if values:
            ax.set_ylim(min(values) * 0.95, max(values) * 1.03)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(result: dict, out: Path, extra_plots: list[Path] = ()) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "eval.json") as tmp:
        tmp.write_text(json.dumps(result, indent=1, default=str))
    with atomic_file(out / "eval.md") as tmp:
        tmp.write_text(markdown(result))
    files = [out / "eval.json", out / "eval.md", plot_losses(result, out / "losses.png"), *extra_plots]
    return files


def _flat_metrics(result: dict) -> dict[str, float]:
    out = {}
    for mode, row in result["summary"].items():
        for key, value in row.items():
            out[f"{mode}/{key}"] = value
    for role, value in result["verbmem"].items():
        out[f"verbmem/{role}"] = value
    for key, value in result["privleak"].items():
        if isinstance(value, dict):
            out.update({f"privleak/{key}/{k}": v for k, v in value.items()})
        else:
            out[f"privleak/{key}"] = value
    for role, kinds in result["truth_ratio"]["by_model"].items():
        out.update({f"truth_ratio/{role}/{k}": v["mean"] for k, v in kinds.items()})
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and not math.isnan(float(v))}


def log_to_mlflow(result: dict, files: list[Path], params: dict, experiment: str = "nulls-eval",
                  tracking_uri: str | None = None, run_name: str | None = None) -> str:
    """One MLflow run with the metrics, the parameters and the report files as artifacts; its id."""
    import mlflow

    uri = tracking_uri or default_tracking_uri()
    with store_lock(uri):  # a new store is migrated when the client first opens it
        client = mlflow.MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment, artifact_location=artifact_location(uri))
        run = client.create_run(exp_id, run_name=run_name)
    run_id = run.info.run_id
    for key, value in params.items():
        client.log_param(run_id, key, str(value)[:500])
    for key, value in _flat_metrics(result).items():
        client.log_metric(run_id, key.replace("%", "pct"), value)
    for path in files:
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id)
    return run_id

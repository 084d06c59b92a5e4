"""The summary of the reproduction report (benchmarks/unlearning_quality.py): the numbers of each
(seed, forget set) evaluation, their means and spreads over seeds and forget sets, the goals of
issue 12 marked met or missed, summary.md, the plots and the RESULT line. Reads the stage outputs
under OUT; runs nothing."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from benchmarks.harness import read_json, write_json

if TYPE_CHECKING:
    from benchmarks.unlearning_quality import Settings

RESULT_KEYS = ("forget_gap_to_oracle", "memorisation_removed", "retain_shift", "verbmem_gap", "privleak",
               "forget_quality_p", "relearn_ratio_vs_npo", "holdout_vs_dense")
FORGET_MODE = "nearest"  # Sink-Off: the mode of every forget-set number in the RESULT line
RETAIN_MODE = "own"



def _censored(steps: int | None, limit: int) -> tuple[int, bool]:
    return (limit + 1, True) if steps is None else (steps, False)


def run_metrics(run: dict) -> dict:
    """The numbers of one (seed, forget set) evaluation that the summary reports."""
    from nulls_megatron.eval.relearn import best_recovery

    e = run["eval"]
    sf, sr = e["summary"][FORGET_MODE], e["summary"][RETAIN_MODE]
    tr = e["truth_ratio"]["by_model"]
    rel = run["relearn"]
    limit = rel["steps"]
    steps = {name: _censored(c["steps_to_halfway"], limit) for name, c in rel["curves"].items()}
    vm, vmh = e["verbmem"], run["verbmem_holdout"]
    m = {
        "forget_gap_to_oracle": sf["gap_to_oracle"],
        "memorisation_removed": sf["memorisation_removed"],
        "retain_shift": sr["retain_shift"],
        "holdout_shift": sr["holdout_shift"],
        "verbmem_gap": vm["after"] - vm["oracle"],
        "privleak": e["privleak"]["privleak_min_k_plus_plus"],
        "privleak_min_k": e["privleak"]["privleak_min_k"],
        "forget_quality_p": sf["forget_quality_p"],
        "relearn_ratio_vs_npo": steps["nulls"][0] / max(steps["nulls+npo"][0], 1),
        # against the same model's holdout text
        "forget_minus_holdout_gap": sf["forget_minus_holdout"] - sf["oracle_forget_minus_holdout"],
        "memorisation_removed_vs_holdout": sf["memorisation_removed_vs_holdout"],
        "verbmem_gap_vs_holdout": (vm["after"] - vmh["after"]) - (vm["oracle"] - vmh["oracle"]),
        "forget_quality_vs_holdout_p": run["forget_quality_vs_holdout_p"],
        # losses
        "forget_before": e["losses"]["before"]["own"]["forget"],
        "holdout_before": e["losses"]["before"]["own"]["holdout"],
        "zeroed_fraction": run["zeroed_fraction"],
        "npo_nulls_forget": run["npo"]["nulls"]["forget"], "npo_nulls_retain": run["npo"]["nulls"]["retain"],
        "npo_dense_forget": run["npo"]["dense"]["forget"],
        "verbmem_after": vm["after"], "verbmem_oracle": vm["oracle"], "verbmem_before": vm["before"],
        "verbmem_holdout_after": vmh["after"], "verbmem_holdout_oracle": vmh["oracle"],
    }
    for mode, row in e["summary"].items():
        for key in ("forget", "oracle_forget", "forget_minus_holdout", "oracle_forget_minus_holdout", "gap_to_oracle",
                    "memorisation_removed", "memorisation_removed_vs_holdout", "retain", "holdout", "retain_shift",
                    "holdout_shift", "forget_quality_p"):
            if key in row:
                m[f"{mode}.{key}"] = row[key]
    for role in ("before", "after", "oracle"):
        for kind in ("unique", "shared"):
            if kind in tr.get(role, {}):
                m[f"truth_ratio.{kind}.{role}"] = tr[role][kind]["mean"]
    for kind in ("unique", "shared"):
        if f"truth_ratio.{kind}.after" in m:
            m[f"truth_ratio.{kind}.after_minus_oracle"] = m[f"truth_ratio.{kind}.after"] - m[f"truth_ratio.{kind}.oracle"]
            m[f"truth_ratio.{kind}.after_minus_before"] = m[f"truth_ratio.{kind}.after"] - m[f"truth_ratio.{kind}.before"]
    for name, (value, censored) in steps.items():
        m[f"relearn_steps.{name}"] = value
        m[f"relearn_censored.{name}"] = float(censored)
    m["relearn_ratio_oracle_vs_npo"] = steps["oracle"][0] / max(steps["nulls+npo"][0], 1)
    for name, curve in rel["curves"].items():
        before = rel["dense_target_before"] if name == "dense+npo" else rel["target_before"]
        m[f"relearn_best_recovery.{name}"] = best_recovery(curve["curve"], before)
        m[f"relearn_min_loss.{name}"] = min(curve["curve"])
    m["relearn_ratio_vs_dense_npo"] = steps["nulls"][0] / max(steps["dense+npo"][0], 1)
    return m


def spread(values: list[float], seeds: list[int]) -> dict:
    v = np.array(values, dtype=float)
    ok = np.isfinite(v)
    if not ok.any():
        return {"mean": math.nan, "std": math.nan, "n": 0}
    per_seed = [float(np.nanmean(v[[s == x for s in seeds]])) for x in sorted(set(seeds))]
    return {"mean": float(np.nanmean(v)), "std": float(np.nanstd(v[ok], ddof=1)) if ok.sum() > 1 else 0.0,
            "min": float(np.nanmin(v)), "max": float(np.nanmax(v)), "n": int(ok.sum()),
            "seed_means": per_seed, "std_over_seeds": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0}


GOALS = [  # (name, metric, test, statement) -- fixed by the issue; tolerances of the two Truth Ratio goals are ours
    ("forget loss within 5% of the oracle's", "forget_gap_to_oracle", lambda x: abs(x) <= 0.05, "|gap| <= 0.05"),
    ("share of memorisation removed >= 0.9", "memorisation_removed", lambda x: x >= 0.9, ">= 0.9"),
    ("retained-source loss moves < 1%", "retain_shift", lambda x: abs(x) < 0.01, "|shift| < 0.01"),
    ("holdout unchanged", "holdout_shift", lambda x: abs(x) < 0.01, "|shift| < 0.01"),
    ("VerbMem within 0.05 of the oracle's", "verbmem_gap", lambda x: abs(x) <= 0.05, "|gap| <= 0.05"),
    ("|PrivLeak| <= 10", "privleak", lambda x: abs(x) <= 10, "|PrivLeak| <= 10"),
    ("forget quality p > 0.05", "forget_quality_p", lambda x: x > 0.05, "p > 0.05"),
    ("unique-fact Truth Ratio falls to the oracle's", "truth_ratio.unique.after_minus_oracle",
     lambda x: abs(x) <= 0.02, "|after - oracle| <= 0.02"),
    ("shared-fact Truth Ratio stays", "truth_ratio.shared.after_minus_before", lambda x: abs(x) <= 0.02,
     "|after - before| <= 0.02"),
    ("relearning: NULLs >= 5x the steps of NPO", "relearn_ratio_vs_npo", lambda x: x >= 5, ">= 5"),
    ("NULLs holdout loss within 3% of the dense model's", "holdout_vs_dense", lambda x: x <= 1.03, "<= 1.03"),
]


def summarise(out: Path, s: Settings, plan: dict) -> dict:
    runs = []
    for seed in s.seeds:
        for f in range(len(plan["forget_sets"])):
            runs.append(read_json(out / "eval" / f"seed{seed}" / f"forget{f}" / "result.json"))
    per_run = [run_metrics(r) for r in runs]
    seeds_of = [r["seed"] for r in runs]
    models = {seed: read_json(out / "eval" / f"seed{seed}" / "models.json") for seed in s.seeds}
    for r, m in zip(runs, per_run):
        mm = models[r["seed"]]
        m["holdout_vs_dense"] = mm["nulls_holdout"]["nearest"] / mm["dense_holdout"]
        m["holdout_vs_dense_backbone"] = mm["nulls_holdout"]["backbone"] / mm["dense_holdout"]
        m["dense_holdout"] = mm["dense_holdout"]
    keys = sorted({k for m in per_run for k in m})
    table = {k: spread([m.get(k, math.nan) for m in per_run], seeds_of) for k in keys}
    goals = []
    for name, key, test, rule in GOALS:
        value = table[key]["mean"] if key in table else math.nan
        goals.append({"goal": name, "metric": key, "rule": rule, "value": value,
                      "met": bool(test(value)) if math.isfinite(value) else None})
    pools = [read_json(p) for p in sorted((out / "pool").glob("seed*-n*.json"))]
    k = plan["k"]
    size = len(plan["forget_sets"][0])
    analytic = {str(n): 1 - (1 - k / n) ** size for n in (1024, 2048, 4096, 8192, 16384, 32768)}
    times = read_json(out / "job_times.json") if (out / "job_times.json").is_file() else {}
    summary = {"settings": dataclasses.asdict(s), "plan": {k2: v for k2, v in plan.items() if k2 != "runs"},
               "runs": [{"seed": r["seed"], "forget_set": r["forget_set"], "metrics": m} for r, m in zip(runs, per_run)],
               "metrics": table, "goals": goals, "models": {str(k2): v for k2, v in models.items()},
               "pool_study": pools, "analytic_zeroed_fraction_per_forget_set": analytic, "job_seconds": times,
               "result": {key: table[key]["mean"] for key in RESULT_KEYS}}
    write_json(out / "summary.json", summary)
    return summary


def result_line(result: dict) -> str:
    fmt = {"forget_gap_to_oracle": "{:.3f}", "memorisation_removed": "{:.2f}", "retain_shift": "{:.3f}",
           "verbmem_gap": "{:.2f}", "privleak": "{:.1f}", "forget_quality_p": "{:.2f}",
           "relearn_ratio_vs_npo": "{:.1f}", "holdout_vs_dense": "{:.3f}"}
    return "RESULT " + " ".join(f"{k}={fmt[k].format(result[k])}" for k in RESULT_KEYS)


def report(summary: dict, out: Path) -> str:
    t = summary["metrics"]

    def row(label: str, key: str, digits: int = 3) -> str:
        v = t.get(key)
        if not v or not v["n"]:
            return f"| {label} | n/a | | |"
        return (f"| {label} | {v['mean']:.{digits}f} | {v['std']:.{digits}f} | {v['std_over_seeds']:.{digits}f} | "
                f"{v['min']:.{digits}f} .. {v['max']:.{digits}f} |")

    lines = ["| metric | mean | std (all runs) | std of seed means | range |", "|---|---|---|---|---|"]
    for mode in ("own", "nearest", "backbone", "expected"):
        lines += [row(f"forget loss after ({mode})", f"{mode}.forget"),
                  row(f"forget loss oracle ({mode})", f"{mode}.oracle_forget"),
                  row(f"gap to oracle ({mode})", f"{mode}.gap_to_oracle"),
                  row(f"memorisation removed ({mode})", f"{mode}.memorisation_removed"),
                  row(f"forget-minus-holdout after ({mode})", f"{mode}.forget_minus_holdout"),
                  row(f"forget-minus-holdout oracle ({mode})", f"{mode}.oracle_forget_minus_holdout"),
                  row(f"memorisation removed vs holdout ({mode})", f"{mode}.memorisation_removed_vs_holdout")]
    lines += [row("forget loss before (own)", "forget_before"), row("holdout loss before", "holdout_before"),
              row("retain shift (own)", "retain_shift", 4), row("holdout shift (own)", "holdout_shift", 4),
              row("zeroed pool fraction", "zeroed_fraction"),
              row("VerbMem before", "verbmem_before"), row("VerbMem after", "verbmem_after"),
              row("VerbMem oracle", "verbmem_oracle"), row("VerbMem gap", "verbmem_gap"),
              row("VerbMem gap vs holdout", "verbmem_gap_vs_holdout"),
              row("PrivLeak (Min-K%++)", "privleak", 1), row("PrivLeak (Min-K%)", "privleak_min_k", 1),
              row("forget quality p", "forget_quality_p"), row("forget quality p vs holdout", "forget_quality_vs_holdout_p")]
    for kind in ("unique", "shared"):
        lines += [row(f"Truth Ratio {kind}: {role}", f"truth_ratio.{kind}.{role}") for role in ("before", "after", "oracle")]
    lines += [row("NPO on NULLs: forget loss", "npo_nulls_forget"), row("NPO on NULLs: retain loss", "npo_nulls_retain"),
              row("NPO on dense: forget loss", "npo_dense_forget")]
    lines += [row(f"relearn steps to halfway: {n}", f"relearn_steps.{n}", 1) for n in ("nulls", "oracle", "nulls+npo", "dense+npo")]
    lines += [row("relearn ratio NULLs / NPO(NULLs)", "relearn_ratio_vs_npo", 2),
              row("relearn ratio NULLs / NPO(dense)", "relearn_ratio_vs_dense_npo", 2)]
    lines += [row(f"relearn: best share of the unlearning undone: {n}", f"relearn_best_recovery.{n}")
              for n in ("nulls", "oracle", "nulls+npo", "dense+npo")]
    lines += [row("dense holdout loss", "dense_holdout"), row("NULLs holdout / dense (nearest)", "holdout_vs_dense"),
              row("NULLs holdout / dense (backbone)", "holdout_vs_dense_backbone")]
    lines += ["", "| goal | rule | measured | met |", "|---|---|---|---|"]
    for g in summary["goals"]:
        met = "n/a" if g["met"] is None else ("met" if g["met"] else "missed")
        lines.append(f"| {g['goal']} | {g['rule']} | {g['value']:.4g} | {met} |")
    lines += ["", "| pool | seed | forgotten | zeroed fraction | retained loss | shift |", "|---|---|---|---|---|---|"]
    for p in summary["pool_study"]:
        base = p["rows"][0]["retained_loss"]
        for r in p["rows"]:
            lines.append(f"| {p['n_pool']} | {p['seed']} | {r['forgotten']} | {r['zeroed_fraction']:.3f} | "
                         f"{r['retained_loss']:.4f} | {100 * (r['retained_loss'] / base - 1):+.2f}% |")
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def plots(summary: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = summary["metrics"]
    paths = []
    # 1. forget losses per mode: after vs oracle (mean, std over runs), before as a line; and forget - holdout
    modes = ["own", "nearest", "backbone", "expected"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, (suffix, title) in zip(axes, (("forget", "forget-set loss (nats/token)"),
                                          ("forget_minus_holdout", "forget minus holdout (nats/token)"))):
        okey = "oracle_forget" if suffix == "forget" else "oracle_forget_minus_holdout"
        x = np.arange(len(modes))
        for dx, key, label in ((-0.2, suffix, "NULLs after unlearning"), (0.2, okey, "retrained oracle")):
            ax.bar(x + dx, [t[f"{m}.{key}"]["mean"] for m in modes], 0.4,
                   yerr=[t[f"{m}.{key}"]["std"] for m in modes], capsize=3, label=label)
        before = t["forget_before"]["mean"] - (0 if suffix == "forget" else t["holdout_before"]["mean"])
        ax.axhline(before, color="k", ls="--", lw=1, label="NULLs before (own sinks)")
        ax.set_xticks(x, modes)
        ax.set_title(title, fontsize=10)
        vals = [t[f"{m}.{k}"]["mean"] for m in modes for k in (suffix, okey)] + [before]
        lo, hi = min(vals), max(vals)
        ax.set_ylim(lo - 0.25 * (hi - lo) - 0.05, hi + 0.25 * (hi - lo) + 0.05)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "uq_losses.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    # 2. relearning curves, mean over runs
    runs = [read_json(out / "eval" / f"seed{r['seed']}" / f"forget{r['forget_set']}" / "result.json")
            for r in summary["runs"]]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name in ("nulls", "oracle", "nulls+npo", "dense+npo"):
        curves = np.array([r["relearn"]["curves"][name]["curve"] for r in runs])
        ax.plot(curves.mean(0), label=name, marker=".", ms=3)
    ax.axhline(np.mean([r["relearn"]["target_before"] for r in runs]), color="k", ls="--", lw=1,
               label="NULLs before unlearning")
    ax.axhline(np.mean([r["relearn"]["dense_target_before"] for r in runs]), color="grey", ls=":", lw=1,
               label="dense before NPO")
    ax.set_xlabel("relearning steps (fine-tuning on the first halves)")
    ax.set_ylabel("second-half loss (nats/token)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "uq_relearn.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    # 3. retained-loss cost against the zeroed pool fraction (measured), and the analytic fraction vs k / n_pool
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for p in summary["pool_study"]:
        base = p["rows"][0]["retained_loss"]
        axes[0].plot([r["zeroed_fraction"] for r in p["rows"]], [100 * (r["retained_loss"] / base - 1) for r in p["rows"]],
                     marker="o", label=f"pool {p['n_pool']} (k/n={p['k'] / p['n_pool']:.4f}), seed {p['seed']}")
    axes[0].set_xlabel("zeroed fraction of the sink pool")
    axes[0].set_ylabel("retained-source loss shift (%)")
    axes[0].axhline(1.0, color="r", ls=":", lw=1, label="goal: < 1%")
    axes[0].legend(fontsize=7)
    an = summary["analytic_zeroed_fraction_per_forget_set"]
    n = np.array(sorted(int(x) for x in an))
    axes[1].plot(summary["plan"]["k"] / n, [an[str(x)] for x in n], marker="s")
    for x in n:
        axes[1].annotate(str(x), (summary["plan"]["k"] / x, an[str(x)]), fontsize=7)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("k / n_pool (labels: n_pool)")
    axes[1].set_ylabel(f"pool zeroed by {len(summary['plan']['forget_sets'][0])} sources: 1-(1-k/n)^n")
    fig.tight_layout()
    paths.append(out / "uq_pool.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    return paths


# ----------------------------------------------------------------------------------------------------

"""The reproduction-report benchmark (benchmarks/unlearning_quality.py) runs end to end in --quick mode:
split, `nulls prep`, three `nulls train` runs, `nulls unlearn`, the evaluation, NPO, the relearning attack,
the pool study and the summary; it ends with its RESULT line and writes every metric to summary.json.
No number is asserted: the quick model is far too small to forget anything meaningful."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.data_required import require_shared_data

ROOT = Path(__file__).resolve().parents[1]
SHARED = require_shared_data()

NUMBER = r"(-?\d+\.\d+|nan)"
RESULT = re.compile(r"RESULT forget_gap_to_oracle={0} memorisation_removed={0} retain_shift={0} verbmem_gap={0} "
                    r"privleak={0} forget_quality_p={0} relearn_ratio_vs_npo={0} holdout_vs_dense={0}".format(NUMBER))


def test_unlearning_quality_quick(tmp_path):
    out = tmp_path / "uq"
    proc = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "benchmarks" / "unlearning_quality.py"), "--quick",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    last = proc.stdout.strip().splitlines()[-1]
    assert RESULT.fullmatch(last), proc.stdout[-2000:]

    summary = json.loads((out / "summary.json").read_text())
    keys = ("forget_gap_to_oracle", "memorisation_removed", "retain_shift", "verbmem_gap", "privleak",
            "forget_quality_p", "relearn_ratio_vs_npo", "holdout_vs_dense")
    assert set(keys) <= set(summary["result"])
    for key, value in zip(keys, RESULT.fullmatch(last).groups()):
        assert value == "nan" or math.isclose(float(value), summary["result"][key], abs_tol=0.051), key
    metrics = summary["metrics"]
    wanted = [*keys, "holdout_shift", "privleak_min_k", "verbmem_gap_vs_holdout", "forget_quality_vs_holdout_p",
              "forget_minus_holdout_gap", "zeroed_fraction", "npo_nulls_forget", "npo_dense_forget",
              "truth_ratio.unique.after", "truth_ratio.unique.oracle", "relearn_steps.nulls", "relearn_steps.oracle",
              "relearn_steps.nulls+npo", "relearn_steps.dense+npo", "holdout_vs_dense_backbone", "dense_holdout"]
    wanted += [f"{mode}.{k}" for mode in ("own", "nearest", "backbone", "expected")
               for k in ("forget", "oracle_forget", "gap_to_oracle", "memorisation_removed", "forget_minus_holdout",
                         "oracle_forget_minus_holdout", "forget_quality_p")]
    missing = [k for k in wanted if k not in metrics]
    assert not missing, missing
    for key in ("forget_gap_to_oracle", "retain_shift", "holdout_vs_dense", "relearn_steps.nulls"):
        assert metrics[key]["n"] == 2 and math.isfinite(metrics[key]["mean"]), key  # 1 seed x 2 forget sets
    assert len(summary["goals"]) == 11 and all("met" in g for g in summary["goals"])
    pool = summary["pool_study"][0]
    assert [r["forgotten"] for r in pool["rows"]] == [0, 5, 10]
    assert 0 < pool["rows"][1]["zeroed_fraction"] < pool["rows"][2]["zeroed_fraction"] < 1
    for name in ("uq_losses.png", "uq_relearn.png", "uq_pool.png", "summary.md"):
        assert (out / name).is_file(), name

    # A rerun reuses every finished stage and prints the same RESULT.
    again = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "benchmarks" / "unlearning_quality.py"), "--quick",
                            "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.strip().splitlines()[-1] == last
    assert "start:" not in again.stdout  # no job ran again

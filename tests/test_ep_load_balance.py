"""benchmarks/ep_load_balance.py: the per-rank token counts of a dispatch by hand, the collateral
formula, and the script end to end on a prep folder's real manifest (no timing: it measures none)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.benchmark_helpers import load_benchmark
from tests.train_helpers import write_prep_dir

ROOT = Path(__file__).resolve().parents[1]


def _module():
    return load_benchmark("ep_load_balance")


def test_tokens_per_rank_splits_documents_across_windows():
    m = _module()
    # documents of 5, 7, 2, 6 tokens on ranks 0, 1, 1, 0; windows of 6 tokens: [0,6) [6,12) [12,18); 2 left over
    counts = m.tokens_per_rank(np.array([5, 7, 2, 6]), np.array([0, 1, 1, 0]), 6, 2)
    assert counts.tolist() == [[5, 1], [0, 6], [4, 2]]
    assert abs(m.collateral(100, 7680, 1) - 100 / 7680) < 1e-12 and round(m.collateral(100, 7680, 100), 4) == 0.7304


def test_script_on_a_prep_folder(tmp_path):
    prep = write_prep_dir(tmp_path / "prep", documents=40)
    proc = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "benchmarks" / "ep_load_balance.py"), "--prep",
                           str(prep), "--seq", "32", "--rows", "2", "--pool-shards", "8", "--n-pool", "64", "--k", "4",
                           "--ep", "2,8"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"RESULT max_over_mean_ep8=(\d+\.\d\d)", last)
    assert match and 1.0 <= float(match.group(1)) <= 8.0, proc.stdout

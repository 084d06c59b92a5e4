"""The training-throughput benchmark runs end to end at its smallest settings and
ends with its RESULT line (no timing is asserted: the machine may be shared)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_throughput_quick_prints_result():
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", os.path.join(ROOT, "benchmarks", "train_throughput.py"),
         "--quick", "--warmup", "1", "--repeats", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(r"RESULT nulls_vs_dense_active=\d+\.\d\d", lines[-1]), proc.stdout[-2000:]

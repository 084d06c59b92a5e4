"""The prepared GPU check runs end to end on the CPU at its smallest settings (both engines train, the
resume is bit-exact, FlexAttention's forward equals SDPA) and ends with its RESULT line; on a task lent a
GPU the same script runs at full size (docs/gpu_check.md)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_quick_on_cpu(tmp_path):
    out = tmp_path / "report.json"
    # Through the same script a lent GPU machine runs (benchmarks/gpu_check.sh; no .gpu_wheels here).
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--quick", "--steps", "4", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "2", "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"RESULT gpu_check=ok device=cpu megatron_tokens_per_s=\d+ deepspeed_tokens_per_s=\d+ mfu=None",
                        last), last
    report = json.loads(out.read_text())
    for engine in ("megatron", "deepspeed"):
        assert report[engine]["resume_bit_exact"] and report[engine]["losses_finite"]
    assert report["triton_kernels"]["ok"] and report["triton_kernels"]["impl"] == "torch reference"
    assert report["flex_attention"]["ok"] and report["flex_attention"]["forward_max_abs_diff"] < 1e-4

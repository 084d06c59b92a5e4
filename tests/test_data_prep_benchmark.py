"""The prep benchmark runs end to end at its smallest settings (the shared corpus once, one repeat),
checks that the single-process baseline wrote the pipeline's shards byte for byte, and ends with its
RESULT line. No timing is asserted: the machine may be shared."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.data_required import require_shared_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_data_prep_quick_prints_result():
    require_shared_data("enwiki/articles_2018.jsonl")
    proc = subprocess.run([sys.executable, "-W", "ignore", os.path.join(ROOT, "benchmarks", "data_prep.py"), "--quick"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "shards byte-identical: True" in out and "parallel efficiency" in out, out[-2000:]
    assert re.fullmatch(r"RESULT ray_vs_single=\d+\.\d\d fraction_of_encode_ceiling=\d+\.\d\d",
                        out.strip().splitlines()[-1]), out[-2000:]

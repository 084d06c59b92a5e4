"""benchmarks/scaling_estimate.py's expert-parallel plan (docs/scaling.md): the pool for a deletion
budget, the sink state per GPU and the dispatch's bytes per step, by hand; and the script end to end."""
from __future__ import annotations

import subprocess
import sys

from tests.benchmark_helpers import ROOT, load_benchmark


def _module():
    return load_benchmark("scaling_estimate")


def test_pool_for_a_deletion_budget_is_the_smallest_that_keeps_it():
    m = _module()
    assert m.pool_for_deletion_budget(1, 1, 0.5) == 2  # 1 of 2 rows zeroed = 0.5
    assert m.pool_for_deletion_budget(10, 1, 0.01) == 1000
    n = m.pool_for_deletion_budget(100, 100, 0.1)
    assert 1 - (1 - 100 / n) ** 100 <= 0.1 < 1 - (1 - 100 / (n - 1)) ** 100


def test_sink_state_and_dispatch_bytes_by_hand():
    m = _module()
    # 10 rows x 3 x d 2 x 1 layer over EP 2 = 30 parameters per GPU; 2 + 4 bytes each, 12 over 3 replicas
    assert m.sink_state_bytes_per_gpu(10, 2, 1, ep=2, expert_dp=3) == 30 * (2 + 4 + 4)
    # 4 all-to-alls per layer (dispatch, combine; both again in backward), half the rows leave at EP 2
    assert m.dispatch_bytes_per_step(10, 4, 2, ep=2) == 4 * 2 * 10 * 4 * 2 / 2
    assert m.dispatch_bytes_per_step(10, 4, 2, ep=1) == 0


def test_script_prints_the_expert_parallel_plan():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scaling_estimate.py"), "--deletions", "100"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "deletion budget: 100 sources at <= 10% of the pool zeroed needs 94,963 sink rows per layer" in out
    ep_rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["1"], ["2"], ["4"], ["8"], ["16"])]
    assert [row[0] for row in ep_rows] == ["1", "2", "4", "8", "16"]
    assert out.strip().splitlines()[-1].startswith("RESULT train_gflop_per_token=")

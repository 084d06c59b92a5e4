"""benchmarks/dispatch.py end to end on 2 gloo ranks at a tiny shape: Megatron-core's all-to-all
dispatcher runs on the CPU under the script's stand-ins, returns what ours returns for the same
routing (the script refuses to print a RESULT otherwise), and the last line has the issue's form.
No timing is checked."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dispatch_benchmark_runs_and_both_dispatchers_agree():
    proc = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "benchmarks" / "dispatch.py"), "--tokens", "300",
                           "--hidden", "16", "--repeats", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(r"RESULT vs_megatron_dispatcher=\d+\.\d\d vs_comm_floor=\d+\.\d\d", lines[-1]), lines[-1]
    sent = [re.search(r"sends \[(\d+), (\d+)\], receives \[(\d+), (\d+)\]", line) for line in lines if line.startswith("rank ")]
    (s00, s01, r00, r01), (s10, s11, r10, r11) = [tuple(map(int, m.groups())) for m in sent]
    assert s00 + s01 == 300 == s10 + s11 and (r00, r01, r10, r11) == (s00, s10, s01, s11)

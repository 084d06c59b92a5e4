"""kernels/ on Triton, checked on CPU in Triton's interpreter against the pure-torch references
(exact for index work: destination histogram, prefix sum and stable scatter index; row permute and
un-permute with the combine add, forward and backward; the grouped sink SwiGLU's output and x, table,
base and main_grad gradients in fp32 within 1e-4, bit-identical across runs), in one child process:
TRITON_INTERPRET must be set before triton is imported. Production code picks Triton only for CUDA
tensors."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_every_triton_kernel_matches_its_reference_in_the_interpreter():
    import triton  # noqa: F401  a pinned dependency: its absence is a failure, not a skip
    proc = subprocess.run([sys.executable, "-W", "ignore", "-m", "tests.triton_interpreter_checks"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "all kernel checks passed"
    assert proc.stdout.count("ok  ") >= 51


def test_the_reference_runs_on_cpu_and_triton_on_cpu_needs_the_interpreter(monkeypatch):
    from kernels.backend import use_triton
    from kernels.destination_permutation import destination_permutation

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = torch.tensor([2, 0, 2, 1])
    assert not use_triton(cpu) and not use_triton(cpu, "torch")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        use_triton(cpu, "triton")
    with pytest.raises(ValueError, match="impl must be one of"):
        use_triton(cpu, "cuda")
    counts, offsets, perm = destination_permutation(cpu, 3)
    assert counts.tolist() == [1, 1, 2] and offsets.tolist() == [0, 1, 2, 4] and perm.tolist() == [1, 3, 0, 2]
    with pytest.raises(ValueError, match="destination 5 is not below n_dest = 3"):
        destination_permutation(torch.tensor([0, 5]), 3)
    with pytest.raises(ValueError, match="dest must be a 1-D"):
        destination_permutation(cpu.float(), 3)

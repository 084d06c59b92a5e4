#!/usr/bin/env bash
# The prepared GPU check (docs/gpu_check.md), as a task lent a GPU machine runs it, in one command:
#     bash benchmarks/gpu_check.sh [--steps 50] [--json $OUT/gpu_check.json]
# With .gpu_wheels/ beside this checkout (the project's pure-Python dependencies as wheels, carried
# to the machine), a virtual environment on top of the machine's own torch, Triton and transformers
# gets them first; without it, $PYTHON (default python3) is expected to have everything, as on a
# developer machine: `PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh --quick` runs the CPU
# version that tests/test_gpu_check.py runs. Stops after GPU_CHECK_TIMEOUT seconds (default 480).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ -d .gpu_wheels ]; then
    venv=${GPU_CHECK_VENV:-/tmp/nulls_gpu_check_venv}
    "$python" -m venv --system-site-packages "$venv"
    "$venv/bin/pip" install --quiet --no-index --no-deps .gpu_wheels/*.whl
    python="$venv/bin/python"
fi
exec timeout "${GPU_CHECK_TIMEOUT:-480}" "$python" -W ignore benchmarks/gpu_check.py "$@"

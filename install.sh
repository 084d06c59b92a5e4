#!/usr/bin/env bash
# Create .venv at the repository root and install nulls-megatron with its pinned dependencies.
# Idempotent: re-running is a no-op until setup.cfg changes.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
"$PYTHON" - <<'PY' || { echo "install.sh: Python >= 3.10 required (set PYTHON=...)" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 10) else 1)
PY

if [ ! -x .venv/bin/python ]; then
  echo "install.sh: creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi

stamp=.venv/.nulls-installed
want=$(cat setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

echo "install.sh: installing nulls-megatron and its dependencies into .venv (first time: a few minutes)"
# torch==2.13.0 is pinned in setup.cfg and so resolves in the same pip call as megatron-core:
# on its own, a later resolution could pull a multi-GB CUDA build. DeepSpeed, when added, builds no ops.
export DS_BUILD_OPS=0
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev,demo]"
echo "$want" > "$stamp"
echo "install.sh: done"

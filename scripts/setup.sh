#!/usr/bin/env bash
# Creates .venv (if needed) and installs torch==2.13.0 first, then secateur with its test extras.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SECATEUR_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
CONSTRAINTS="$VENV/constraints.txt"
echo "torch==2.13.0" > "$CONSTRAINTS"
# torch first, pinned: a looser requirement would pull several GB of CUDA packages.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "$CONSTRAINTS" -e "$ROOT[dev]" 2>&1 | grep -v "is ignored" || true
"$VENV/bin/python" -c "import torch, secateur; assert torch.__version__.startswith('2.13.0'), torch.__version__"
export PATH="$VENV/bin:$PATH"
export HF_HUB_OFFLINE=1
export SECATEUR_SHARED_DIR="${SECATEUR_SHARED_DIR:-$ROOT/../shared}"
export SECATEUR_DATA_DIR="${SECATEUR_DATA_DIR:-$SECATEUR_SHARED_DIR/data}"

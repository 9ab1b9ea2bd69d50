#!/usr/bin/env bash
# Create benchmarks/.venv-llmc: an environment for llm-compressor reference runs.
#
# llm-compressor pins its own transformers / compressed-tensors, so it lives in its own venv and
# never touches the secateur venv. torch is installed FIRST (the local CPU wheel 2.13.0) and every
# later install is constrained to that torch, so pip can never swap in another build.
#
# Usage:  bash benchmarks/llmcompressor/setup.sh            (idempotent)
#         LLMC_VERSION=0.14.0.1 PYTHON=python3 bash benchmarks/llmcompressor/setup.sh
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BENCH="$(dirname "$HERE")"
VENV="${VENV:-$BENCH/.venv-llmc}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
LLMC_VERSION="${LLMC_VERSION:-0.14.0.1}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
# Keep the environment out of git without touching the repo's .gitignore (as Python 3.13+ does).
[ -f "$VENV/.gitignore" ] || echo '*' > "$VENV/.gitignore"
PIP="$VENV/bin/pip"

CONSTRAINTS="$VENV/constraints.txt"
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"

# 1. torch first (a local CPU wheel is found through pip's find-links).
"$PIP" install "torch==$TORCH_VERSION"
# 2. llm-compressor and what it needs offline on CPU; never another torch.
"$PIP" install -c "$CONSTRAINTS" "llmcompressor==$LLMC_VERSION" datasets safetensors

# 3. Fail loudly if anything replaced torch.
"$VENV/bin/python" - <<PY
import importlib.metadata as md, sys
want = "$TORCH_VERSION"
got = md.version("torch")
if not got.startswith(want):
    sys.exit(f"torch was replaced: want {want}, got {got}")
for pkg in ("torch", "transformers", "compressed-tensors", "llmcompressor", "datasets", "accelerate"):
    try:
        print(f"{pkg}=={md.version(pkg)}")
    except md.PackageNotFoundError:
        print(f"{pkg}: not installed")
PY
"$PIP" freeze > "$VENV/freeze.txt"
echo "environment ready: $VENV  (pip freeze in $VENV/freeze.txt)"

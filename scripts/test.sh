#!/usr/bin/env bash
# The test command: sets up .venv on a fresh machine, then runs the whole default test suite.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
python -m pytest -q "$@"

#!/usr/bin/env bash
# The demo: sets up .venv on a fresh machine, then compresses the real models in the shared folder
# end to end (evaluate dense, prune, evaluate again, save artifacts) and prints a before/after table.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
secateur demo --models "$SECATEUR_SHARED_DIR/models" --out "${DEMO_OUT:-runs/demo}" "$@"

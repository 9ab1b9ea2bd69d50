#!/usr/bin/env bash
# The main job: sets up .venv on a fresh machine, then builds two real families of variants from
# pipeline files (stories260K: distill -> prune -> quantize and GPTQ W4, plus one variant rejected
# by its gate on purpose; all-MiniLM-L6-v2: W8A8, a distilled 3-layer student, and that student
# W8A8), each gated on measured quality, speed and size, records them in the registry and writes
# one HTML report per family. Each pipeline is planned first (predicted time and peak memory per
# stage; the first plan measures this machine's cost model, about 40 s). A second run reuses every
# cached stage.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
OUT="${DEMO_OUT:-runs/demo}"
export SECATEUR_HOME="${SECATEUR_HOME:-$OUT/home}"
declare -A VARIANTS=([stories]="base student student-sparse student-sparse-w8 gptq-w4 wanda50"
                     [minilm]="base w8a8 student student-w8a8")
for family in stories minilm; do
  secateur plan "examples/pipelines/$family-family.yaml" --workdir "$OUT/pipelines"   # predicted time and memory
  secateur run "examples/pipelines/$family-family.yaml" --workdir "$OUT/pipelines" --keep-going --allow-rejected "$@"
  refs=(); for v in ${VARIANTS[$family]}; do refs+=("$family/$v"); done
  secateur registry compare "${refs[@]}"
  secateur report "$family" --out "$OUT/report-$family.html"
done

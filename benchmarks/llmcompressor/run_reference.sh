#!/usr/bin/env bash
# llm-compressor reference numbers for secateur to stand next to.
#
#   quality  stories260K, P1 calibration (128 x 256 consecutive TinyStories windows):
#            SparseGPT / Wanda 50 % unstructured and 2:4, magnitude 50 %; each pruned
#            checkpoint scored with secateur's P1 evaluator (perplexity on the eval split).
#   timing   P4 timing model (random Llama 768/2048/12 layers, seed 0), 64 random windows of
#            512 tokens (seed 0): SparseGPT 50 % and Wanda 50 %, wall time and peak RSS.
#
# Usage:  bash benchmarks/llmcompressor/run_reference.sh [quality] [timing]   (default: both)
# Needs:  benchmarks/.venv-llmc (bash benchmarks/llmcompressor/setup.sh) and the secateur venv.
# Env:    SECATEUR_PY (default /work/venv/bin/python), SECATEUR_BIN (default /work/venv/bin/secateur),
#         SECATEUR_DATA_DIR (default /work/shared/data), THREADS (default 2).
# Writes: benchmarks/results/llmc_quality_stories260K.json, benchmarks/results/llmc_timing.json;
#         checkpoints and per-run records under benchmarks/.cache/llmc-runs/.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BENCH="$(dirname "$HERE")"
CACHE="$BENCH/.cache"
RUNS="$CACHE/llmc-runs"
RESULTS="$BENCH/results"
LLMC_PY="$BENCH/.venv-llmc/bin/python"
SECATEUR_PY="${SECATEUR_PY:-/work/venv/bin/python}"
SECATEUR_BIN="${SECATEUR_BIN:-/work/venv/bin/secateur}"
STORIES="${STORIES:-/work/shared/models/stories260K/hf}"
THREADS="${THREADS:-2}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export SECATEUR_DATA_DIR="${SECATEUR_DATA_DIR:-/work/shared/data}"

what=("$@")
[ ${#what[@]} -eq 0 ] && what=(quality timing)
[ -x "$LLMC_PY" ] || { echo "missing $LLMC_PY: run bash $HERE/setup.sh first" >&2; exit 1; }
mkdir -p "$RUNS" "$RESULTS"

prune() {  # name model calib method pattern
    local name=$1 model=$2 calib=$3 method=$4 pattern=$5
    echo "== $name: $method $pattern ($(date +%T), load $(cut -d' ' -f1-3 /proc/loadavg))"
    "$LLMC_PY" "$HERE/run_prune.py" --model "$model" --calib "$calib" --method "$method" \
        --sparsity 0.5 --pattern "$pattern" --threads "$THREADS" \
        --out "$RUNS/$name" --json "$RUNS/$name.json" > "$RUNS/$name.log" 2>&1 \
        || { tail -20 "$RUNS/$name.log" >&2; return 1; }
    tail -1 "$RUNS/$name.log"
}

for w in "${what[@]}"; do
    case "$w" in
    quality)
        calib="$CACHE/stories260K-calib-128x256.safetensors"
        [ -f "$calib" ] || "$SECATEUR_PY" "$HERE/make_inputs.py" stories
        names=()
        for spec in "sparsegpt 0:0 stories-sparsegpt-50" "wanda 0:0 stories-wanda-50" \
                    "sparsegpt 2:4 stories-sparsegpt-2of4" "wanda 2:4 stories-wanda-2of4" \
                    "magnitude 0:0 stories-magnitude-50"; do
            set -- $spec
            prune "$3" "$STORIES" "$calib" "$1" "$2"
            "$SECATEUR_BIN" eval "$RUNS/$3" --task perplexity --data tinystories --json \
                > "$RUNS/$3.eval.json" 2> "$RUNS/$3.eval.log"
            names+=("$3")
        done
        "$SECATEUR_PY" - "$RUNS" "$RESULTS/llmc_quality_stories260K.json" "${names[@]}" <<'PY'
import json, sys
from pathlib import Path
runs, out, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
rows = []
for n in names:
    r = json.loads((runs / f"{n}.json").read_text())
    e = json.loads((runs / f"{n}.eval.json").read_text())
    rows.append({"name": n, "method": r["method"], "pattern": r["pattern"],
                 "sparsity": r["achieved"]["sparsity"], "ppl_p1": e["value"],
                 "eval_windows": e["extra"]["windows"], "oneshot_wall_s": r["oneshot_wall_s"],
                 "peak_rss_gib": r["peak_rss_gib"], "modifier_args": r["settings"]["modifier_args"]})
rec = {"benchmark": "llmcompressor reference, stories260K P1", "dense_ppl_p1": 5.508,
       "versions": r["versions"], "settings": {k: v for k, v in r["settings"].items()
                                               if k not in ("modifier", "modifier_args")},
       "eval": "secateur eval --task perplexity --data tinystories (P1)", "rows": rows}
out.write_text(json.dumps(rec, indent=2) + "\n")
print(f"{'run':<26}{'sparsity':>9}{'PPL':>9}{'oneshot s':>11}")
for x in rows:
    print(f"{x['name']:<26}{x['sparsity']:>9.4f}{x['ppl_p1']:>9.2f}{x['oneshot_wall_s']:>11.1f}")
print(f"wrote {out}")
PY
        ;;
    timing)
        calib="$CACHE/timing-calib-64x512.safetensors"
        [ -f "$calib" ] && [ -f "$CACHE/timing-model/config.json" ] || "$SECATEUR_PY" "$HERE/make_inputs.py" timing
        prune timing-sparsegpt-50 "$CACHE/timing-model" "$calib" sparsegpt 0:0
        prune timing-wanda-50 "$CACHE/timing-model" "$calib" wanda 0:0
        "$SECATEUR_PY" - "$RUNS" "$RESULTS/llmc_timing.json" <<'PY'
import json, sys
from pathlib import Path
runs, out = Path(sys.argv[1]), Path(sys.argv[2])
rows = []
for n in ("timing-sparsegpt-50", "timing-wanda-50"):
    r = json.loads((runs / f"{n}.json").read_text())
    rows.append({"name": n, "method": r["method"], "oneshot_wall_s": r["oneshot_wall_s"],
                 "peak_rss_bytes": r["peak_rss_bytes"], "peak_rss_gib": r["peak_rss_gib"],
                 "sparsity": r["achieved"]["sparsity"], "threads": r["settings"]["threads"],
                 "modifier": r["settings"]["modifier"], "modifier_args": r["settings"]["modifier_args"]})
rec = {"benchmark": "llmcompressor reference, P4 timing model", "versions": r["versions"],
       "host": r["host"], "settings": {k: v for k, v in r["settings"].items()
                                       if k not in ("modifier", "modifier_args")}, "rows": rows}
out.write_text(json.dumps(rec, indent=2) + "\n")
for x in rows:
    print(f"{x['name']:<22} oneshot {x['oneshot_wall_s']:8.1f} s   peak RSS {x['peak_rss_gib']:.2f} GiB"
          f"   sparsity {x['sparsity']:.4f}   threads {x['threads']}")
print(f"wrote {out}")
PY
        ;;
    *) echo "unknown part '$w' (quality | timing)" >&2; exit 2 ;;
    esac
done

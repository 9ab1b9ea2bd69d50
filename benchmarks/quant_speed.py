"""Quantization time on the P4 timing model: secateur GPTQ vs llm-compressor GPTQ, W4A16 group 128.

The P4 timing model (random Llama, hidden 768, intermediate 2048, 12 layers, vocab 32000, fp32),
64 random calibration windows of 512 tokens (seed 0), 2 threads. secateur runs
``GPTQConfig(bits=4, strategy="group", group_size=128)`` (its defaults otherwise: columns in order,
scales per group from the updated weights, calibration forwards in the model's dtype unless
``--compute-dtype bfloat16``); llm-compressor runs ``GPTQModifier(scheme="W4A16", targets=["Linear"],
ignore=["lm_head"])`` with its defaults (``actorder="static"``, block 128, dampening 0.01) through
``oneshot`` (benchmarks/llmcompressor/run_quant.py, in its own venv). Each job runs in its own
process (so peak RSS is its own); secateur and llm-compressor jobs alternate (the order rotates
every repeat; with several --compute-dtype values each repeat times llm-compressor once) and the
table reports ratios secateur / llm-compressor.

    python benchmarks/quant_speed.py [--repeats 1] [--compute-dtype float32,bfloat16] [--no-llmc]

Prints a table and writes benchmarks/results/quant_speed.json. Bar from the issue: time ratio at
most 0.5 (llm-compressor takes about 135 s here).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, environment, print_table, write_json  # noqa: E402
from prune_speed import prepare  # noqa: E402  (the timing model and the 64 x 512 ids, cached)

LLMC_PYTHON = REPO / "benchmarks" / ".venv-llmc" / "bin" / "python"
RUNNER = REPO / "benchmarks" / "llmcompressor" / "run_quant.py"

OURS = r"""
import json, sys, time, torch
from secateur.progress import peak_rss_bytes  # VmHWM: ru_maxrss carries the parent's peak over execve
torch.set_num_threads(int(sys.argv[3]))
from secateur import lineage
import secateur
from safetensors.torch import load_file
from secateur.artifacts import load
from secateur.quant.gptq import GPTQConfig
calib, compute_dtype, model_dir = sys.argv[1], sys.argv[2], sys.argv[4]
model = load(model_dir).model
ids = load_file(calib)["input_ids"]
fields = dict(bits=4, strategy="group", group_size=128)
if compute_dtype != "float32":
    fields["compute_dtype"] = compute_dtype
config = GPTQConfig(**fields)
start = time.perf_counter()
secateur.compress_(model, config, data=ids)
wall = time.perf_counter() - start
result = lineage.of(model).history()[-1]["result"]
kinds = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "weight_q")})
print(json.dumps({"wall_s": wall, "peak_rss_mib": peak_rss_bytes() / 2**20,
                  "threads": torch.get_num_threads(), "calibration": result.get("calibration"),
                  "loop_seconds": result.get("loop_seconds"), "modules": result.get("modules"),
                  "quantized_classes": kinds,
                  "config": {k: getattr(config, k) for k in ("bits", "strategy", "group_size", "symmetric", "damp",
                                                               "block_size", "act_order", "static_groups",
                                                               "batch_size", "compute_dtype", "activation_dtype",
                                                               "propagate", "observer")}}, default=str))
"""


def run_ours(model_dir: Path, calib: Path, compute_dtype: str, threads: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SECATEUR_PROGRESS": "0"}
    proc = subprocess.run([sys.executable, "-c", OURS, str(calib), compute_dtype, str(threads), str(model_dir)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"secateur gptq failed: {proc.stderr.strip().splitlines()[-3:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_theirs(model_dir: Path, calib: Path, threads: int) -> dict | None:
    if not LLMC_PYTHON.exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [str(LLMC_PYTHON), str(RUNNER), "--model", str(model_dir), "--calib", str(calib), "--method", "gptq",
               "--scheme", "W4A16", "--json", f"{tmp}/r.json", "--threads", str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if proc.returncode != 0:
            print(f"llm-compressor gptq failed: {proc.stderr.strip().splitlines()[-3:]}", file=sys.stderr)
            return None
        record = json.loads(Path(f"{tmp}/r.json").read_text())
        return {"wall_s": record["oneshot_wall_s"], "peak_rss_mib": record["peak_rss_bytes"] / 2**20,
                "threads": record["settings"]["threads"], "record": record}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-llmc", action="store_true", help="time secateur only")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compute-dtype", default="float32",
                        help="secateur's calibration forwards, comma-separated to time several: float32 (its "
                             "default, the model's dtype) and/or bfloat16")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dtypes = args.compute_dtype.split(",")
    if any(d not in ("float32", "bfloat16") for d in dtypes):
        parser.error("--compute-dtype: float32 and/or bfloat16")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir, calib = prepare()
    rows, runs = [], []
    for repeat in range(args.repeats):
        jobs = [("secateur", d) for d in dtypes] + [("llmc", None)]
        shift = repeat % len(jobs)  # rotate who goes first, so no tool always runs on a cooler machine
        jobs = jobs[shift:] + jobs[:shift]
        got: dict = {}
        for tool, dtype in jobs:
            if tool == "secateur":
                got[dtype] = run_ours(model_dir, calib, dtype, args.threads)
                print(f"repeat {repeat} secateur {dtype}: {got[dtype]['wall_s']:.1f} s", file=sys.stderr)
            else:
                got["llmc"] = None if args.no_llmc else run_theirs(model_dir, calib, args.threads)
                print(f"repeat {repeat} llmc: " + (f"{got['llmc']['wall_s']:.1f} s" if got["llmc"] else "skipped"),
                      file=sys.stderr)
        theirs = got["llmc"]
        for dtype in dtypes:
            ours = got[dtype]
            ratio = ours["wall_s"] / theirs["wall_s"] if theirs else None
            rss = ours["peak_rss_mib"] / theirs["peak_rss_mib"] if theirs else None
            runs.append({"repeat": repeat, "order": [t if d is None else f"{t}:{d}" for t, d in jobs],
                         "compute_dtype": dtype, "secateur": ours, "llmcompressor": theirs,
                         "time_ratio": ratio, "rss_ratio": rss})
            rows.append([f"GPTQ W4A16 g128 #{repeat}", f"{ours['threads']} threads, {dtype}",
                         ours["wall_s"], theirs and theirs["wall_s"], ratio,
                         ours["peak_rss_mib"], theirs and theirs["peak_rss_mib"], rss])
    print_table("GPTQ W4A16 (group 128) on the P4 timing model (64 × 512 tokens, "
                f"{args.threads} threads): wall seconds and peak RSS MiB",
                ["method", "secateur setting", "secateur s", "llmc s", "time ratio", "secateur MiB", "llmc MiB",
                 "RSS ratio"], rows)
    medians = {}
    for dtype in dtypes:
        ratios = [r["time_ratio"] for r in runs if r["compute_dtype"] == dtype and r["time_ratio"] is not None]
        medians[dtype] = statistics.median(ratios) if ratios else None
        if medians[dtype] is not None:
            print(f"bar ({dtype}): median time ratio {medians[dtype]:.3f} (needs <= 0.5): "
                  f"{'pass' if medians[dtype] <= 0.5 else 'FAIL'}")
    data = {"environment": environment(), "threads": args.threads, "calibration": "64 x 512 random ids, seed 0",
            "model": "P4 timing model (random Llama 768/2048/12 layers, fp32)",
            "secateur_config": "GPTQConfig(bits=4, strategy='group', group_size=128[, compute_dtype='bfloat16'])",
            "llmc_modifier": "GPTQModifier(scheme='W4A16', targets=['Linear'], ignore=['lm_head']) "
                             "(defaults: actorder='static', block_size=128, dampening_frac=0.01)",
            "median_time_ratio": medians,
            "bar": {"max_time_ratio": 0.5, "passes": {d: None if m is None else m <= 0.5 for d, m in medians.items()}},
            "loadavg_after": os.getloadavg(), "runs": runs}
    print(f"wrote {write_json('quant_speed', data, args.out)}")


if __name__ == "__main__":
    main()

"""Calibrated pruning wall time and peak memory: secateur vs llm-compressor on the P4 timing model.

The P4 timing model (random Llama, hidden 768, intermediate 2048, 12 layers, vocab 32000, fp32),
64 random calibration windows of 512 tokens (seed 0), 2 threads, SparseGPT and Wanda at 50%.
Each job runs in its own process (so peak RSS is its own); secateur and llm-compressor jobs
alternate, and the table reports ratios.

    python benchmarks/prune_speed.py [--llmc] [--repeats 1] [--compute-dtype bfloat16|float32]

Prints a table and writes benchmarks/results/prune_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, environment, print_table, write_json  # noqa: E402

LLMC_PYTHON = REPO / "benchmarks" / ".venv-llmc" / "bin" / "python"
CACHE = REPO / "benchmarks" / ".cache"

OURS = r"""
import json, sys, time, torch
from secateur.progress import peak_rss_bytes  # VmHWM: ru_maxrss carries the parent's peak over execve
torch.set_num_threads(int(sys.argv[4]))
from secateur import lineage
import secateur
from safetensors.torch import load_file
from secateur.api import get_method
from secateur.artifacts import load
method, calib, compute_dtype = sys.argv[1], sys.argv[2], sys.argv[3]
model = load(sys.argv[5]).model
ids = load_file(calib)["input_ids"]
fields = {"sparsity": 0.5}
if compute_dtype != "float32":
    fields["compute_dtype"] = compute_dtype
start = time.perf_counter()
secateur.compress_(model, get_method(method).config(**fields), data=ids)
wall = time.perf_counter() - start
result = lineage.of(model).history()[-1]["result"]
print(json.dumps({"wall_s": wall, "peak_rss_mib": peak_rss_bytes() / 2**20,
                  "sparsity": result["sparsity"], "threads": torch.get_num_threads()}))
"""


def prepare() -> tuple[Path, Path]:
    """The timing model saved once, and the calibration ids file."""
    import torch
    from safetensors.torch import save_file

    from secateur.testing import timing_model

    model_dir, calib = CACHE / "timing-model", CACHE / "timing-calib-64x512.safetensors"
    if not (model_dir / "config.json").exists():
        timing_model(seed=0).save_pretrained(model_dir)
    if not calib.exists():
        ids = torch.randint(0, 32000, (64, 512), generator=torch.Generator().manual_seed(0))
        save_file({"input_ids": ids}, str(calib))
    return model_dir, calib


def run_ours(method: str, model_dir: Path, calib: Path, compute_dtype: str, threads: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SECATEUR_PROGRESS": "0"}
    proc = subprocess.run([sys.executable, "-c", OURS, method, str(calib), compute_dtype, str(threads), str(model_dir)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"secateur {method} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_theirs(method: str, model_dir: Path, calib: Path, threads: int) -> dict | None:
    if not LLMC_PYTHON.exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [str(LLMC_PYTHON), str(REPO / "benchmarks" / "llmcompressor" / "run_prune.py"), "--model", str(model_dir),
               "--calib", str(calib), "--method", method, "--sparsity", "0.5", "--out", f"{tmp}/out",
               "--json", f"{tmp}/r.json", "--threads", str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if proc.returncode != 0:
            print(f"llm-compressor {method} failed: {proc.stderr.strip().splitlines()[-3:]}", file=sys.stderr)
            return None
        record = json.loads(Path(f"{tmp}/r.json").read_text())
        return {"wall_s": record["oneshot_wall_s"], "peak_rss_mib": record["peak_rss_bytes"] / 2**20,
                "sparsity": record.get("sparsity"), "threads": record.get("threads"), "record": record}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llmc", action="store_true", help="also time llm-compressor (benchmarks/llmcompressor/setup.sh)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compute-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--methods", default="sparsegpt,wanda")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir, calib = prepare()
    rows, runs = [], []
    for method in args.methods.split(","):
        for repeat in range(args.repeats):
            ours = run_ours(method, model_dir, calib, args.compute_dtype, args.threads)
            theirs = run_theirs(method, model_dir, calib, args.threads) if args.llmc else None
            ratio = ours["wall_s"] / theirs["wall_s"] if theirs else None
            rss = ours["peak_rss_mib"] / theirs["peak_rss_mib"] if theirs else None
            runs.append({"method": method, "repeat": repeat, "secateur": ours, "llmcompressor": theirs,
                         "time_ratio": ratio, "rss_ratio": rss, "compute_dtype": args.compute_dtype})
            rows.append([method, f"50% ({args.compute_dtype})", ours["wall_s"], theirs and theirs["wall_s"], ratio,
                         ours["peak_rss_mib"], theirs and theirs["peak_rss_mib"], rss])
    print_table("Calibrated pruning on the P4 timing model (64 × 512 tokens, "
                f"{args.threads} threads): wall seconds and peak RSS MiB",
                ["method", "setting", "secateur s", "llmc s", "time ratio", "secateur MiB", "llmc MiB", "RSS ratio"], rows)
    data = {"environment": environment(), "threads": args.threads, "calibration": "64 x 512 random ids, seed 0",
            "model": "P4 timing model (random Llama 768/2048/12 layers, fp32)", "runs": runs}
    print(f"wrote {write_json('prune_speed', data, args.out)}")


if __name__ == "__main__":
    main()

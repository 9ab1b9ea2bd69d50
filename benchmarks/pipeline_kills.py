"""A pipeline killed with SIGKILL at random moments, then run again, ends with the artifacts of an
uninterrupted run (issue 23's bar: at least 10 random kills).

The pipeline: stories260K -> SparseGPT 50% (calibration loop, checkpointed per block) -> RTN W8
(from the pruned model) -> GPTQ W4 of the base. One uninterrupted run gives the reference weights
hashes; then, in a fresh work folder, `secateur run` is started as a subprocess and killed with
SIGKILL after a random delay, again and again (each start resumes where the last was killed), until
a run finishes; this is repeated until at least --kills kills happened. Every finished run's
weights hashes must equal the reference.

    python benchmarks/pipeline_kills.py [--kills 10] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import SHARED, environment, print_table, setup_env, write_json

PIPELINE = {
    "name": "kills", "base": str(SHARED / "models" / "stories260K" / "hf"),
    "data": {"source": "tinystories", "samples": 64, "seq_len": 256},
    "eval": [{"task": "perplexity", "data": "tinystories", "options": {"max_windows": 16}}],
    "speed": False,
    "variants": {"sg50": {"steps": [{"method": "sparsegpt", "sparsity": 0.5}]},
                 "sg50-w8": {"parent": "sg50", "steps": [{"method": "rtn", "bits": 8, "strategy": "channel"}]},
                 "w4": {"steps": [{"method": "gptq", "bits": 4, "strategy": "channel"}]}},
}


def hashes(workdir: Path) -> dict[str, str]:
    result = json.loads((workdir / "kills" / "result.json").read_text())
    return {name: stage["weights_sha256"] for name, stage in result["stages"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/pipeline_kills.json)")
    args = parser.parse_args()
    setup_env()
    rng = random.Random(args.seed)
    env = {**os.environ, "SECATEUR_PROGRESS": "0"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env["SECATEUR_HOME"] = str(tmp / "home")
        spec = tmp / "kills.json"
        spec.write_text(json.dumps(PIPELINE))
        cli = [sys.executable, "-m", "secateur.cli", "run", str(spec), "--no-register"]
        start = time.perf_counter()
        subprocess.run(cli + ["--workdir", str(tmp / "clean")], env=env, check=True, capture_output=True)
        clean_seconds = time.perf_counter() - start
        reference = hashes(tmp / "clean")
        rows, kills, attempt = [], 0, 0
        while kills < args.kills:
            attempt += 1
            work = tmp / f"run{attempt}"
            starts = 0
            while True:
                starts += 1
                proc = subprocess.Popen(cli + ["--workdir", str(work)], env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
                delay = rng.uniform(1.0, clean_seconds)  # past the interpreter's start, inside the run
                try:
                    code = proc.wait(timeout=delay)
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    kills += 1
                    print(f"run {attempt}: killed after {delay:.1f} s (kill {kills})", file=sys.stderr)
                    continue
                if code != 0:
                    sys.exit(f"run {attempt} exited {code} after a resume")
                break
            got = hashes(work)
            rows.append({"run": attempt, "starts": starts, "kills": starts - 1, "identical": got == reference})
            print(f"run {attempt}: {starts - 1} kills, identical={got == reference}", file=sys.stderr)
    table = [[r["run"], r["kills"], r["starts"], "yes" if r["identical"] else "NO"] for r in rows]
    print_table(f"pipeline runs killed with SIGKILL at random moments (uninterrupted run {clean_seconds:.1f} s)",
                ["run", "kills", "starts", "weights identical to the uninterrupted run"], table)
    ok = all(r["identical"] for r in rows)
    print(f"bar (>= {args.kills} kills, every resumed run identical): {'PASS' if ok and kills >= args.kills else 'FAIL'}")
    write_json("pipeline_kills", {"environment": environment(), "kills": kills, "runs": rows, "reference": reference,
                                  "uninterrupted_seconds": clean_seconds, "pipeline": PIPELINE, "pass": ok}, args.out)


if __name__ == "__main__":
    main()

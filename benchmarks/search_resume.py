"""A search killed at three random points and resumed, against the same search run uninterrupted
(issue 25's bar): does it re-run a finished trial, and does it finish with the same front?

Both runs search stories260K with the same space and seed in fresh folders (``secateur search``
processes, ``--no-register``). The killed one gets SIGKILL at three moments drawn at random (seed
``--seed``) between its start and the uninterrupted run's duration, each time restarted with the same
command; its journal must name every trial once. The fronts are compared by membership; the
quality of each trial (deterministic) must be identical, the speed differs by the machine's noise.

    python benchmarks/search_resume.py [--seed 0]

Prints a table and writes benchmarks/results/search_resume.json.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, environment, print_table, setup_env, write_json  # noqa: E402

SPACE = {"name": "resume", "axes": {"structured": ["none", {"drop_layers": 1, "mlp": 0.0}],
                                    "sparsity": ["none", {"method": "sparsegpt", "sparsity": 0.3}],
                                    "quant": ["none", {"method": "gptq", "bits": [4, 8], "strategy": "channel"}]},
         "trials": 8}


def command(space: Path, work: Path) -> list[str]:
    return [sys.executable, "-m", "secateur.cli", "search", str(SHARED / "models" / "stories260K" / "hf"), "--space",
            str(space), "--budget", "30m", "-w", str(work), "--no-register", "--json"]


def journal(work: Path) -> list[dict]:
    found = list((work / SPACE["name"]).glob("search-*/trials.jsonl"))
    if not found:
        return []
    out = []
    for line in found[0].read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    setup_env()
    env = {**os.environ, "SECATEUR_PROGRESS": "0"}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        space = root / "space.json"
        space.write_text(json.dumps(SPACE))
        start = time.perf_counter()
        whole = subprocess.run(command(space, root / "whole"), env=env, capture_output=True, text=True)
        whole_seconds = time.perf_counter() - start
        if whole.returncode not in (0, 1):
            raise SystemExit(whole.stderr[-2000:])
        reference = json.loads(whole.stdout)
        rng = random.Random(args.seed)
        kills = sorted(rng.uniform(0.1, 0.9) * whole_seconds for _ in range(3))
        killed_at, work = [], root / "killed"
        begun = time.perf_counter()
        for moment in kills:
            proc = subprocess.Popen(command(space, work), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
            while proc.poll() is None and time.perf_counter() - begun < moment:
                time.sleep(0.1)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            killed_at.append({"at_s": round(time.perf_counter() - begun, 1), "trials_done": len(journal(work))})
        final = subprocess.run(command(space, work), env=env, capture_output=True, text=True)
        resumed = json.loads(final.stdout)
        ids = [r["id"] for r in journal(work)]
    quality = {p["id"]: (p["measured"] or {}).get("quality") for p in reference["points"]}
    quality_after = {p["id"]: (p["measured"] or {}).get("quality") for p in resumed["points"]}
    label = {p["id"]: p["label"] for p in reference["points"]}
    same_quality = quality == quality_after
    rerun = len(ids) - len(set(ids))
    same_front = sorted(reference["front"]) == sorted(resumed["front"])
    rows = [["kills (s after start: trials finished)", ", ".join(f"{k['at_s']}: {k['trials_done']}" for k in killed_at)],
            ["trials in the journal / distinct", f"{len(ids)} / {len(set(ids))}"],
            ["finished trials run twice", str(rerun)],
            ["every trial's quality identical", str(same_quality)],
            ["front, uninterrupted", ", ".join(label[c] for c in reference["front"])],
            ["front, killed 3 times", ", ".join(label[c] for c in resumed["front"])],
            ["same front", str(same_front)]]
    print_table("a search killed three times and resumed vs uninterrupted (stories260K)", ["measure", "value"], rows)
    write_json("search_resume", {"environment": environment(), "kills": killed_at, "journal_ids": ids,
                                 "rerun": rerun, "same_quality": same_quality, "same_front": same_front,
                                 "front_whole": reference["front"], "front_resumed": resumed["front"],
                                 "whole_seconds": whole_seconds,
                                 "points": {name: [{"label": p["label"], "quality": (p["measured"] or {}).get("quality"),
                                                    "latency": (p["confirmed"] or p["measured"] or {}).get("latency"),
                                                    "rounds": (p["confirmed"] or {}).get("round_latencies"),
                                                    "front": p["front"]} for p in run["points"]]
                                            for name, run in (("whole", reference), ("resumed", resumed))}})


if __name__ == "__main__":
    main()

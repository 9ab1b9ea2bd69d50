"""Calibration over 1 and 2 processes on the P4 timing model, and a model of how it scales.

GPTQ W4 (channel) of the P4 timing model (random Llama: hidden 768, 12 layers, intermediate 2048)
on random-token calibration data, run by ``torchrun`` with 1 process × all threads and with 2
processes × half the threads each (the machine's cores split, not added). Each rank reports where
its calibration loop spent its time (``phase_seconds``: observation forwards, combining the
statistics, compressing, sharing the results, re-running the block) and gloo's measured all-reduce
bandwidth.

The scaling model, per block, for W ranks on a fixed number of cores:

    T(W) = F·s(W)/W + C·max_share(W) + bytes(W)/bw + R·s(W)/W

F and R (the observation and re-run forwards, plus the XᵀX products) are split by batches: each
rank does 1/W of them, on 1/W of the threads, so F·s(W)/W where s(W) is how much slower a rank's
GEMMs run on fewer threads (measured: the 1-process forward time against each rank's); C, the
compression (GPTQ's column sweeps: Python loops over small tensors, ~one thread's work), is split
by input groups, so a rank does its largest share of the groups; bytes(W) is what crosses between
ranks: the all-reduce of each input group's XᵀX (d² float32; a ring all-reduce moves 2(W−1)/W of
it per rank) plus the broadcast of every compressed module's tensors. The model's prediction of
the 2-process time from the 1-process phases is printed beside the measurement.

    python benchmarks/distributed_calibration.py [--samples 32] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import environment, print_table, write_json


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from secateur import lineage
    from secateur.api import compress_
    from secateur.artifacts import load
    from secateur.calibrate import init_from_env
    from secateur.recipe import Recipe

    rank, size = init_from_env()
    loaded = load(args.model)
    ids = torch.randint(0, loaded.model.config.vocab_size, (args.samples, args.seq_len),
                        generator=torch.Generator().manual_seed(0))
    bw = None
    if size > 1:  # gloo's all-reduce bandwidth on a 16 MiB tensor (what a 2048-wide Hessian is)
        t = torch.ones(4 << 20)
        dist.all_reduce(t)
        start = time.perf_counter()
        for _ in range(5):
            dist.all_reduce(t)
        bw = 5 * t.numel() * 4 / (time.perf_counter() - start)
    recipe = Recipe.from_dict({"steps": [{"method": "gptq", "bits": 4, "strategy": "channel"}]})
    start = time.perf_counter()
    compress_(loaded.model, recipe, data=ids)
    seconds = time.perf_counter() - start
    result = lineage.read(loaded.model).history()[0]["result"]
    print("RESULT " + json.dumps({"rank": rank, "size": size, "seconds": seconds, "threads": torch.get_num_threads(),
                                  "phases": result["calibration"].get("phase_seconds", {}), "allreduce_bps": bw}),
          flush=True)


def run(model: Path, nproc: int, threads: int, args: argparse.Namespace) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads // nproc), "SECATEUR_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", __file__,
           "--worker", "--model", str(model), "--samples", str(args.samples), "--seq-len", str(args.seq_len)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"error: {nproc}-process run failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return sorted((json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")),
                  key=lambda r: r["rank"])


def communication_bytes(world: int) -> float:
    """Bytes one rank sends for the whole model (12 blocks of the timing model): the ring all-reduce
    of each input group's XᵀX (2(W−1)/W of it) and its share of the broadcast compressed modules
    (weights float32, scales and zero points: about 4 bytes per weight)."""
    hidden, inter, blocks = 768, 2048, 12
    hessians = (3 * hidden * hidden + inter * inter) * 4              # q/k/v, o, gate/up (d=768); down (d=2048)
    weights = (4 * hidden * hidden + 3 * hidden * inter) * 4
    return blocks * (2 * (world - 1) / world * hessians + (world - 1) / world * weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    from secateur.testing import timing_model

    with tempfile.TemporaryDirectory(prefix="secateur-dist-bench-") as tmp:
        model = Path(tmp) / "timing"
        timing_model().save_pretrained(model)
        one = run(model, 1, args.threads, args)[0]
        two = run(model, 2, args.threads, args)
    slowest = max(two, key=lambda r: r["seconds"])
    p1 = one["phases"]
    forwards = p1.get("observe", 0.0) + p1.get("rerun", 0.0)
    two_forwards = max(r["phases"].get("observe", 0.0) + r["phases"].get("rerun", 0.0) for r in two)
    slowdown = two_forwards / (forwards / 2) if forwards else 1.0     # s(2): a rank's GEMMs on half the threads
    share = max(r["phases"].get("compress", 0.0) for r in two) / max(p1.get("compress", 1e-9), 1e-9)
    bw = min(r["allreduce_bps"] or float("inf") for r in two)
    comm = communication_bytes(2) / bw
    predicted = forwards * slowdown / 2 + p1.get("compress", 0.0) * share + comm
    rows = [[f"1 × {one['threads']} threads", f"{one['seconds']:.1f}", f"{forwards:.1f}", f"{p1.get('compress', 0):.1f}",
             "—", "—", "—"],
            [f"2 × {two[0]['threads']} threads", f"{slowest['seconds']:.1f}", f"{two_forwards:.1f}",
             f"{max(r['phases'].get('compress', 0) for r in two):.1f}",
             f"{max(r['phases'].get('combine', 0) + r['phases'].get('share', 0) for r in two):.2f}",
             f"{communication_bytes(2) / 2**20:.0f} MiB at {bw / 2**30:.2f} GiB/s = {comm:.2f} s", f"{predicted:.1f}"]]
    print_table("GPTQ W4 of the P4 timing model: calibration over 1 and 2 processes (threads split)",
                ["processes", "loop s", "forwards s", "compress s", "combine+share s", "model: communication",
                 "model: predicted loop s"], rows)
    print(f"speed-up {one['seconds'] / slowest['seconds']:.2f}x; the model predicts the 2-process loop at "
          f"{predicted:.1f} s (measured {slowest['seconds']:.1f} s): forwards ×{slowdown:.2f}/2 (a rank's GEMMs on "
          f"half the threads), compression ×{share:.2f} (the largest share of input groups), communication {comm:.2f} s")
    out = write_json("distributed_calibration", {"environment": environment(), "samples": args.samples,
                                                 "seq_len": args.seq_len, "one": one, "two": two,
                                                 "model": {"forward_slowdown": slowdown, "compress_share": share,
                                                           "communication_bytes": communication_bytes(2),
                                                           "allreduce_bps": bw, "predicted_seconds": predicted},
                                                 "speedup": one["seconds"] / slowest["seconds"]}, args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()

"""W8A8 on MiniLM: STS-B dev quality and encoding speed, against fp32 and torch's quantize_dynamic.

Protocol P2 (STS-B dev, batch 64, max_length 128, fp32 inputs), 2 threads. Variants: dense fp32;
secateur SmoothQuant W8A8 (int8 per-channel weights, dynamic per-token int8 activations, the int8
GEMM this machine measured fastest) in its runtime (fused blocks, secateur.runtime.fused_encoder) and the same model
module by module; torch's ``quantize_dynamic`` (per-tensor activation scales). Each variant encodes the
whole dev set (both sides, 3,000 sentences) ``--rounds`` times, alternating; speed-up = dense
median / variant median. Batch independence: the embedding of one sentence encoded alone vs
inside its batch of 64 (max |difference|).

    python benchmarks/quant_encoder_speed.py [--rounds 3]

Prints a table and writes benchmarks/results/quant_encoder_speed.json, with the CPU and the kernels
each variant ran (chosen by measurement on this machine). Bar: W8A8 within 0.2 of dense (86.72)
and at least 3x faster than fp32, on either kind of CPU (with AMX or without).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, environment, print_table, setup_env, write_json  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    setup_env()
    import torch

    import secateur
    from secateur.data import calibration_set, source
    from secateur.evaluate import evaluate
    from secateur.evaluate.sts import sentence_embeddings
    from secateur.quant.smoothquant import SmoothQuantConfig
    from secateur.runtime import optimize_

    torch.set_num_threads(2)
    path = SHARED / "models" / "all-MiniLM-L6-v2"
    dense, tok, _ = secateur.load(path)
    w8a8 = copy.deepcopy(dense)
    secateur.compress_(w8a8, SmoothQuantConfig(), data=calibration_set("stsb", tok, 128, 128, split="train"))
    unfused = copy.deepcopy(w8a8)  # the same integers, module by module (no fused blocks)
    optimize_(w8a8)  # the runtime's fused encoder blocks
    dynamic = torch.ao.quantization.quantize_dynamic(copy.deepcopy(dense), {torch.nn.Linear}, dtype=torch.qint8)
    models = {"dense fp32": dense, "secateur SmoothQuant W8A8": w8a8, "secateur W8A8, module by module": unfused,
              "torch quantize_dynamic": dynamic}
    first, second, _ = source("stsb").pairs("dev")
    texts = list(first) + list(second)

    evaluated = {name: evaluate(m, tok, "sts", "stsb") for name, m in models.items()}
    quality = {name: r.value for name, r in evaluated.items()}
    kernels = {name: r.settings.get("kernels", {}) for name, r in evaluated.items()}  # chosen by measurement
    times = {name: [] for name in models}
    for r in range(args.rounds):
        for name, model in models.items():
            start = time.perf_counter()
            sentence_embeddings(model, tok, texts)
            times[name].append(time.perf_counter() - start)
            print(f"round {r}: {name}: {times[name][-1]:.2f} s", file=sys.stderr)
    independence = {}
    for name, model in models.items():
        batch = sentence_embeddings(model, tok, texts[:64])
        alone = sentence_embeddings(model, tok, texts[5:6])
        independence[name] = float((batch[5] - alone[0]).abs().max())
    base = statistics.median(times["dense fp32"])
    rows, results = [], {}
    for name in models:
        t = statistics.median(times[name])
        results[name] = {"spearman": quality[name], "seconds": times[name], "median_s": t, "speedup": base / t,
                         "batch_dependence_max_abs": independence[name], "kernels": kernels[name]}
        rows.append([name, quality[name], quality[name] - quality["dense fp32"], t, base / t, independence[name]])
    print_table(f"P2 MiniLM STS-B dev: quality and encoding time of {len(texts)} sentences, 2 threads, "
                f"{args.rounds} alternating rounds",
                ["variant", "Spearman", "Δ", "seconds", "speed-up", "batch dependence"], rows)
    ours = results["secateur SmoothQuant W8A8"]
    passed = ours["spearman"] >= quality["dense fp32"] - 0.2 and ours["speedup"] >= 3.0
    print(f"bar (W8A8 within 0.2 of dense and >= 3x): {'PASS' if passed else 'FAIL'}")
    for name, used in kernels.items():
        if used:
            print(f"kernels {name}: {used}")
    out = write_json("quant_encoder_speed", {"environment": environment(), "rounds": args.rounds,
                                             "variants": results, "bar_passed": passed}, args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

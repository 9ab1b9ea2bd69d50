"""Early exit on all-MiniLM-L6-v2: STS-B dev Spearman against mean blocks computed and measured encode
throughput, side by side with the same model without exits (issue 27's encoder bar: at least 1.5x
throughput at batch 1, at most 0.5 below its STS-B dev Spearman).

1. Train exit heads after blocks 2-5 with the ``early_exit`` method (backbone frozen; STS-B *train*
   sentences; distillation from the model's own last layer).
2. Calibrate the exit threshold on STS-B **train** pairs (the first ``--calib-pairs``): the lowest
   threshold of a grid whose Spearman there stays within ``--max-drop`` of the model without exits.
   The dev split is never used to choose it.
3. On STS-B dev (P2): Spearman, mean blocks per sentence, and the curve over every threshold of the
   grid (for the plot and the table); then encode throughput at batch 1 and batch 64 on dev
   sentences, the model without exits (transformers' forward) and with exits alternating, in one
   process (ratios).

    python benchmarks/early_exit.py [--steps 300] [--max-drop 0.5] [--head linear|mlp] [--tune-backbone]

With ``--tune-backbone`` the whole model trains with the heads, its final embedding held to the
original model's: the row "without exits" is then the tuned model's own last layer, and the
original model's dev Spearman is printed beside it.

With ``--w8a8`` the exit model is also quantized with SmoothQuant W8A8 (int8 weights per channel,
per-token int8 activations; calibrated on STS-B train sentences; the exit heads' linears quantized
with the rest, as a recipe chaining ``early_exit`` and ``smoothquant`` does), its blocks fused by the runtime (``optimize_``), and the exits run on those quantized blocks: its threshold is chosen the same way against the W8A8 model
without exits, and fp32 without exits, W8A8 without exits and W8A8 with exits are timed
alternating in one process (issue 27: the exits combined with the quantized runtime).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import SHARED, environment, print_table, setup_env, write_json

MINILM = SHARED / "models" / "all-MiniLM-L6-v2"
GRID = (0.8, 0.85, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.985, 0.99, 0.995, 2.0)


def batches(tokenizer, texts, size):
    import torch

    for start in range(0, len(texts), size):
        enc = tokenizer(texts[start:start + size], truncation=True, max_length=128, padding=True, return_tensors="pt")
        yield enc["input_ids"], enc["attention_mask"].to(torch.long)


def exits_of(model, tokenizer, texts, size=64):
    """Every exit's embedding of every text (one pass; :func:`simulate` then prices each threshold)."""
    import torch

    from secateur.runtime.early_exit import exit_embeddings

    parts = [exit_embeddings(model, ids, mask) for ids, mask in batches(tokenizer, texts, size)]
    return {b: torch.cat([p[b] for p in parts]) for b in parts[0]}


def spearman(pairs, views, threshold):
    """(Spearman × 100, mean blocks) at ``threshold`` from the precomputed exits of both sides."""
    from scipy.stats import spearmanr

    from secateur.runtime.early_exit import simulate

    (a, ba), (b, bb) = simulate(views[0], threshold), simulate(views[1], threshold)
    cosine = (a * b).sum(-1).double().numpy()
    return float(spearmanr(cosine, pairs[2])[0]) * 100, float((ba.sum() + bb.sum()) / (len(ba) + len(bb)))


def throughput(runners, tokenizer, texts, size, rounds):
    """Sentences per second of each ``runner(ids, mask)``, the runners alternating round by round
    (medians), after a shared warm-up."""
    import torch

    prepared = list(batches(tokenizer, texts, size))
    seen: dict[str, list[float]] = {name: [] for name in runners}
    with torch.inference_mode():
        for ids, mask in prepared[:3]:  # warm-up
            for run in runners.values():
                run(ids, mask)
        for _ in range(rounds):
            for name, run in runners.items():
                start = time.perf_counter()
                for ids, mask in prepared:
                    run(ids, mask)
                seen[name].append(len(texts) / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in seen.items()}


def plain_and_exits(model, threshold):
    """The model's own forward and the early-exit encoder at ``threshold``, as throughput runners."""
    from secateur.runtime.early_exit import ExitEncoder

    encoder = ExitEncoder(model, threshold)
    return (lambda ids, mask: model(input_ids=ids, attention_mask=mask)), encoder.encode


def curve(pairs, views, base):
    """Spearman, its drop from ``base`` and mean blocks at every threshold of GRID."""
    points = []
    for t in GRID:
        rho, blocks = spearman(pairs, views, t)
        points.append({"threshold": t, "spearman": rho, "drop": base - rho, "mean_blocks": blocks})
    return points


def choose(train, views, base_calib, max_drop):
    """The calibration curve over GRID on the train pairs, and the lowest threshold within ``max_drop``."""
    calibration = curve(train, views, base_calib)
    return calibration, min((c["threshold"] for c in calibration if c["drop"] <= max_drop), default=2.0)


def w8a8_exits(model, tokenizer, train, dev, texts, max_drop, rounds, fp32_dev, fp32_plain):
    """The exit model quantized with SmoothQuant W8A8, its exits on the quantized blocks: the threshold
    chosen on the train pairs against the W8A8 model without exits, the dev curve, and throughput of
    fp32 without exits, W8A8 without exits and W8A8 with exits, alternating."""
    import copy

    from secateur import compress_
    from secateur.data import calibration_set
    from secateur.quant.smoothquant import SmoothQuantConfig
    from secateur.runtime import optimize_
    from secateur.runtime.early_exit import heads_of

    quantized = copy.deepcopy(model)
    compress_(quantized, SmoothQuantConfig(), data=calibration_set("stsb", tokenizer, 128, 128, split="train"))
    head_kinds = sorted({type(m).__name__ for m in heads_of(quantized).modules() if "Linear" in type(m).__name__})
    optimize_(quantized)  # the runtime's fused W8A8 encoder blocks, which the exits then run block by block
    views = {name: (exits_of(quantized, tokenizer, pairs[0]), exits_of(quantized, tokenizer, pairs[1]))
             for name, pairs in (("train", train), ("dev", dev))}
    base_calib, _ = spearman(train, views["train"], 2.0)
    calibration, chosen = choose(train, views["train"], base_calib, max_drop)
    base_dev, _ = spearman(dev, views["dev"], 2.0)
    dev_curve = [{**c, "drop_vs_fp32": fp32_dev - c["spearman"]} for c in curve(dev, views["dev"], base_dev)]
    plain, exits = plain_and_exits(quantized, chosen)
    speed = {}
    for size in (1, 64):
        got = throughput({"fp32": fp32_plain, "w8a8": plain, "w8a8_exits": exits}, tokenizer, texts, size, rounds)
        speed[size] = {"fp32_per_s": got["fp32"], "w8a8_per_s": got["w8a8"], "w8a8_exits_per_s": got["w8a8_exits"]}
    return {"head_modules": head_kinds, "chosen_threshold": chosen, "no_exit_dev": base_dev, "no_exit_calibration": base_calib,
            "calibration": calibration, "dev": dev_curve, "speed": speed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps of the exit heads")
    parser.add_argument("--max-drop", type=float, default=0.5, help="Spearman points allowed on the calibration pairs")
    parser.add_argument("--calib-pairs", type=int, default=1500)
    parser.add_argument("--speed-texts", type=int, default=256, help="dev sentences timed per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--head", default="linear", choices=("linear", "mlp"), help="exit head kind")
    parser.add_argument("--tune-backbone", action="store_true", help="train the backbone jointly with the heads")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--artifact", default=None, help="an artifact with exit heads already (skips training)")
    parser.add_argument("--w8a8", action="store_true",
                        help="also run the exits on the model quantized with SmoothQuant W8A8 (timed beside fp32)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    setup_env()

    import torch

    from secateur import compress_
    from secateur.artifacts import load, save
    from secateur.data import source
    from secateur.recipe import Recipe

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="secateur-early-exit-") as tmp:
        if args.artifact is None:
            loaded = load(MINILM)
            recipe = Recipe.from_dict({"steps": [{"method": "early_exit", "data": ["stsb:train"], "seq_len": 128,
                                                  "steps": args.steps, "batch_size": 64, "lr": args.lr,
                                                  "head": args.head, "tune_backbone": args.tune_backbone,
                                                  "eval_every": 0}]})
            compress_(loaded.model, recipe, tokenizer=loaded.tokenizer)
            artifact = save(loaded.model, Path(tmp) / "minilm-exits", tokenizer=loaded.tokenizer, recipe=recipe)
        else:
            artifact = Path(args.artifact)
        loaded = load(artifact)
        model, tokenizer = loaded.model, loaded.tokenizer
        stsb = source("stsb")
        train = tuple(x[: args.calib_pairs] for x in stsb.pairs("train"))
        dev = stsb.pairs("dev")
        views = {name: (exits_of(model, tokenizer, pairs[0]), exits_of(model, tokenizer, pairs[1]))
                 for name, pairs in (("train", train), ("dev", dev))}
        base_calib, _ = spearman(train, views["train"], 2.0)   # a threshold above 1 never exits
        tuned_calib = base_calib
        if args.tune_backbone:  # the reference is the original model, not the tuned one's last layer
            original = load(MINILM).model
            orig = {name: (exits_of(original, tokenizer, pairs[0]), exits_of(original, tokenizer, pairs[1]))
                    for name, pairs in (("train", train), ("dev", dev))}
            base_calib, _ = spearman(train, orig["train"], 2.0)
        calibration, chosen = choose(train, views["train"], base_calib, args.max_drop)
        base_dev, _ = spearman(dev, orig["dev"] if args.tune_backbone else views["dev"], 2.0)
        tuned_dev, _ = spearman(dev, views["dev"], 2.0)
        dev_curve = curve(dev, views["dev"], base_dev)
        at = next(c for c in dev_curve if c["threshold"] == chosen)
        texts = dev[0][: args.speed_texts]
        plain, exits = plain_and_exits(model, chosen)
        speed = {}
        for size in (1, 64):
            got = throughput({"plain": plain, "exits": exits}, tokenizer, texts, size, args.rounds)
            speed[size] = {"plain_per_s": got["plain"], "exits_per_s": got["exits"],
                           "speedup": got["exits"] / got["plain"]}
        quantized = (w8a8_exits(model, tokenizer, train, dev, texts, args.max_drop, args.rounds, base_dev, plain)
                     if args.w8a8 else None)
    rows = [[f"{c['threshold']:g}" + (" (chosen)" if c["threshold"] == chosen else ""),
             f"{k['spearman']:.2f}", f"{k['drop']:+.2f}", f"{c['spearman']:.2f}", f"{c['drop']:+.2f}",
             f"{c['mean_blocks']:.2f}"] for c, k in zip(dev_curve, calibration)]
    print_table(f"MiniLM early exit: STS-B Spearman against mean blocks (the original model: dev {base_dev:.2f}, "
                f"calibration {base_calib:.2f}; its last layer after this training: dev {tuned_dev:.2f}, "
                f"calibration {tuned_calib:.2f})",
                ["threshold", "calib ρ", "calib drop", "dev ρ", "dev drop", "dev mean blocks"], rows)
    print_table("encode throughput at the chosen threshold (sentences/s, medians of alternating rounds)",
                ["batch", "without exits", "with exits", "speed-up"],
                [[str(b), f"{s['plain_per_s']:.1f}", f"{s['exits_per_s']:.1f}", f"{s['speedup']:.2f}x"]
                 for b, s in speed.items()])
    if quantized is not None:
        q, qat = quantized, next(c for c in quantized["dev"] if c["threshold"] == quantized["chosen_threshold"])
        print_table(f"The same exits on the SmoothQuant W8A8 model (its dev without exits {q['no_exit_dev']:.2f}; "
                    f"threshold {q['chosen_threshold']:g} chosen on train pairs: dev {qat['spearman']:.2f}, "
                    f"{qat['drop']:+.2f} vs W8A8, {qat['drop_vs_fp32']:+.2f} vs fp32, {qat['mean_blocks']:.2f} blocks; "
                    f"exit heads: {', '.join(q['head_modules'])})",
                    ["batch", "fp32 without exits", "W8A8 without exits", "W8A8 with exits", "W8A8 × fp32",
                     "W8A8 + exits × fp32"],
                    [[str(b), f"{v['fp32_per_s']:.1f}", f"{v['w8a8_per_s']:.1f}", f"{v['w8a8_exits_per_s']:.1f}",
                      f"{v['w8a8_per_s'] / v['fp32_per_s']:.2f}x", f"{v['w8a8_exits_per_s'] / v['fp32_per_s']:.2f}x"]
                     for b, v in q["speed"].items()])
    bar = speed[1]["speedup"] >= 1.5 and at["drop"] <= 0.5
    print(f"bar (>= 1.5x at batch 1, dev drop <= 0.5): {'met' if bar else 'NOT met'} — {speed[1]['speedup']:.2f}x, "
          f"dev drop {at['drop']:+.2f} at threshold {chosen:g} (chosen on train pairs), {at['mean_blocks']:.2f} "
          f"mean blocks of {model.config.num_hidden_layers}")
    out = write_json("early_exit", {"environment": environment(), "settings": vars(args), "steps": args.steps,
                                    "max_drop": args.max_drop,
                                    "chosen_threshold": chosen, "no_exit_dev": base_dev, "no_exit_calibration": base_calib,
                                    "last_layer_dev": tuned_dev, "last_layer_calibration": tuned_calib,
                                    "calibration": calibration, "dev": dev_curve, "speed": speed, "bar_met": bar,
                                    "w8a8": quantized,
                                    "seconds": time.perf_counter() - start, "threads": torch.get_num_threads()},
                     args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())

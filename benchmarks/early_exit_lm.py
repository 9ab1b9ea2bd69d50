"""Early exit on stories260K (CALM): P1 perplexity against mean blocks per token and measured decode
tokens/s at batch 1, side by side with the same model without exits, a static variant (one block
removed and distilled), and the exits on a W4A16 model (issue 27's causal bar: at least 1.3x decode
tokens/s at batch 1 with P1 perplexity at most 3% above the model without exits).

1. Train exit adapters after blocks 1-4 with the ``early_exit`` method (backbone frozen; the P1
   calibration paragraphs; KL to the model's own next-token distribution).
2. Calibrate the threshold on the P1 **calibration** windows (512 tokens, the calibration split's
   stream): the lowest threshold of the grid whose perplexity there stays within ``--max-increase``
   percent of the model without exits. The evaluation split never chooses it.
3. On the P1 evaluation windows (all 670): perplexity and mean blocks per token at every threshold
   of the grid (teacher forcing with state propagation, :func:`exit_nll`: the arithmetic of batch-1
   decoding).
4. Decode speed at batch 1: greedy, ``--new-tokens`` after 16-token prompts of evaluation
   paragraphs, in rounds alternating the model without exits (the same loop, no exit computed),
   with exits at the chosen threshold, and transformers' own eager ``generate`` for reference;
   medians of the rounds, as ratios to the loop without exits.
5. The same on the exit model quantized to W4A16 (RTN, groups of 32), the exits running on the
   quantized blocks; and a static variant (one block removed by ShortGPT, 300 distillation steps).

    python benchmarks/early_exit_lm.py [--steps 600] [--max-increase 2]

Attempt 2 (CALM's training and a cheap check) adds flags: ``--tune-backbone`` (the backbone trained
jointly, its final output held to the original model by KL, ``--final-weight``), ``--exit-weighting
depth`` (later exits weighted more), ``--head mlp``, ``--confidence classifier`` (a learned exit
classifier instead of the softmax margin), ``--check 2,3`` (only those exits are checked at run time),
``--generate N`` (teacher samples added to the training text), ``--skip-w4`` / ``--skip-static``. With
a tuned backbone the reference stays the **original** model without exits: the threshold is the
lowest whose calibration perplexity is within ``--max-increase`` of the original's, the P1 increase
is against the original, and the decode speed-up is against the original in the same loop.
The evaluation split prices the grid around the chosen threshold only (``--eval-grid all`` for every
threshold).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, environment, print_table, setup_env, write_json  # noqa: E402

STORIES = SHARED / "models" / "stories260K" / "hf"
GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)
STUDENT = """name: early-exit-static-student
model: {model}
data: {{source: tinystories, samples: 128, seq_len: 256}}
steps:
  - {{method: structured, drop_layers: 1, mlp: 0.0}}
  - {{method: distill, data: ["tinystories:calibration"], steps: 300, lr: 2.0e-3, temperature: 1.0, eval_every: 0}}
"""


def windows(tokenizer, split):
    import torch

    from secateur.data import paragraph_stream, source

    stream = paragraph_stream(tokenizer, source("tinystories").texts(split))
    n = len(stream) // 512
    return torch.tensor(stream[: n * 512]).view(n, 512)


def decode_speed(model, prompts, threshold, new_tokens, rounds, reference=None, check=None):
    """Tokens/s at batch 1 (medians of alternating rounds): the loop without exits (on ``reference``,
    default ``model``), with exits, and transformers' generate; the mean blocks per generated token
    with exits."""
    import torch

    from secateur.runtime.early_exit_lm import ExitLM

    plain = ExitLM(reference if reference is not None else model, None, max_len=16 + new_tokens)
    exits = ExitLM(model, threshold, max_len=16 + new_tokens, exits=check)
    times = {"no exits": [], "exits": [], "transformers": []}
    blocks = []
    for p in prompts[:2]:  # warm-up
        plain.greedy(p, 4), exits.greedy(p, 4)
    with torch.inference_mode():
        model.generate(torch.tensor([prompts[0]]), max_new_tokens=4, do_sample=False)
        for _ in range(rounds):
            for name in times:
                tokens, seconds = 0, 0.0
                for p in prompts:
                    if name == "transformers":
                        start = time.perf_counter()
                        out = model.generate(torch.tensor([p]), max_new_tokens=new_tokens, do_sample=False,
                                             min_new_tokens=new_tokens)
                        seconds += time.perf_counter() - start
                        tokens += out.shape[1] - len(p)
                        continue
                    start = time.perf_counter()
                    d = (plain if name == "no exits" else exits).greedy(p, new_tokens)
                    seconds += time.perf_counter() - start
                    tokens += len(d.tokens)
                    if name == "exits":
                        blocks += d.blocks
                times[name].append(tokens / seconds)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"tokens_per_s": med, "speedup": med["exits"] / med["no exits"],
            "transformers_vs_loop": med["transformers"] / med["no exits"], "mean_blocks": sum(blocks) / len(blocks)}


def forced_costs(model, reference, prompts, new_tokens, rounds):
    """Decode tokens/s at batch 1 when every generated token leaves at exit k (threshold 0, only
    exit k checked), for each exit, in alternating rounds with the loop without exits: the cost of
    a token that leaves at k, so the speed-up any exit distribution can give follows from them."""
    import torch

    from secateur.runtime.early_exit import heads_of
    from secateur.runtime.early_exit_lm import ExitLM

    exits = [b for b in heads_of(model).blocks if b < model.config.num_hidden_layers]
    lms = {"none": ExitLM(reference, None, max_len=16 + new_tokens)}
    lms.update({k: ExitLM(model, 0.0, max_len=16 + new_tokens, exits=(k,)) for k in exits})
    rates = {k: [] for k in lms}
    with torch.inference_mode():
        for lm in lms.values():
            lm.greedy(prompts[0], 4)
        for _ in range(rounds):
            for k, lm in lms.items():
                tokens, seconds = 0, 0.0
                for p in prompts:
                    d = lm.greedy(p, new_tokens)
                    tokens, seconds = tokens + len(d.tokens) - 1, seconds + d.seconds
                rates[k].append(tokens / seconds)
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"tokens_per_s": {str(k): v for k, v in med.items()},
            "speedup_if_all_exit_at": {str(k): med[k] / med["none"] for k in exits}}


def bound(costs, exits, tokens, blocks):
    """The decode speed-up an exit distribution gives at the forced per-exit costs: ``exits`` maps exit
    block -> tokens leaving there, out of ``tokens``; the rest run all ``blocks`` (priced as the loop
    without exits plus nothing: a lower bound on their cost, so an upper bound on the speed-up)."""
    rate = costs["tokens_per_s"]
    time = sum(n / rate[str(k)] for k, n in exits.items()) + (tokens - sum(exits.values())) / rate["none"]
    return (tokens / rate["none"]) / time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps of the exit adapters")
    parser.add_argument("--max-increase", type=float, default=2.0, help="perplexity increase allowed on the "
                                                                        "calibration windows, percent")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--eval-windows", type=int, default=0, help="0: all 670 (P1)")
    parser.add_argument("--head", choices=("linear", "mlp"), default="linear")
    parser.add_argument("--tune-backbone", action="store_true", help="train the backbone jointly (CALM)")
    parser.add_argument("--final-weight", type=float, default=1.0, help="weight of the final output's KL to the "
                                                                        "original (--tune-backbone)")
    parser.add_argument("--exit-weighting", choices=("equal", "depth"), default="equal")
    parser.add_argument("--confidence", choices=("margin", "classifier"), default="margin")
    parser.add_argument("--check", default="", help="exits checked at run time, e.g. 2,3 (default: all)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per training window")
    parser.add_argument("--generate", type=int, default=0, help="teacher samples added to the training text")
    parser.add_argument("--grid", default=",".join(map(str, GRID)), help="thresholds, comma-separated")
    parser.add_argument("--eval-grid", choices=("near", "all"), default="all",
                        help="price on the evaluation split every threshold, or the chosen one and its neighbours")
    parser.add_argument("--skip-w4", action="store_true")
    parser.add_argument("--skip-static", action="store_true")
    parser.add_argument("--save", default=None, help="keep the trained exit model under this folder")
    parser.add_argument("--artifact", default=None, help="an exit model kept by --save: no training")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    setup_env()
    grid = tuple(sorted(float(x) for x in args.grid.split(",") if x.strip()))
    check = tuple(int(x) for x in args.check.split(",") if x.strip()) or None

    import torch

    import secateur
    from secateur import compress_
    from secateur.artifacts import load, save
    from secateur.data import source
    from secateur.recipe import Recipe
    from secateur.runtime.early_exit_lm import exit_nll

    began = time.perf_counter()
    loaded = load(STORIES)
    tok = loaded.tokenizer
    calib, evaluation = windows(tok, "calibration"), windows(tok, "evaluation")
    if args.eval_windows:
        evaluation = evaluation[: args.eval_windows]
    with tempfile.TemporaryDirectory(prefix="secateur-early-exit-lm-") as tmp:
        step = {"method": "early_exit", "data": ["tinystories:calibration"], "seq_len": args.seq_len, "steps": args.steps,
                "batch_size": args.batch_size, "lr": args.lr, "temperature": 1.0, "eval_every": 0,
                "head": args.head, "exit_weighting": args.exit_weighting, "confidence": args.confidence,
                "curve": list(grid)}
        if args.tune_backbone:
            step.update(tune_backbone=True, final_weight=args.final_weight)
        if args.generate:
            step.update(generate=args.generate)
        recipe = Recipe.from_dict({"steps": [step]})
        original = load(STORIES).model
        if args.artifact:  # exits trained by an earlier run (--save): priced and timed again, e.g. with --check
            artifact = Path(args.artifact)
            card = json.loads((artifact / "compression.json").read_text(encoding="utf-8"))
        else:
            compress_(loaded.model, recipe, tokenizer=tok)
            artifact = save(loaded.model, Path(args.save or tmp) / "stories-exits", tokenizer=tok, recipe=recipe)
            card = json.loads((Path(artifact) / "compression.json").read_text(encoding="utf-8"))
        step_curve = card["history"][-1]["result"].get("curve")
        model = load(artifact).model
        student = None
        if not args.skip_static:
            recipe_path = Path(tmp) / "student.yaml"
            recipe_path.write_text(STUDENT.format(model=STORIES), encoding="utf-8")
            subprocess.run([sys.executable, "-c", "from secateur.cli import main; main()", "compress",
                            str(recipe_path), "--out", str(Path(tmp) / "student")], check=True,
                           stdout=subprocess.DEVNULL)
            student = load(Path(tmp) / "student").model
    trained_seconds = time.perf_counter() - began
    models = [("fp32", model, original)]
    if not args.skip_w4:
        quantized, quantized_original = copy.deepcopy(model), copy.deepcopy(original)
        secateur.compress_(quantized, secateur.RTNConfig(bits=4, group_size=32))
        secateur.compress_(quantized_original, secateur.RTNConfig(bits=4, group_size=32))
        models.append(("w4a16", quantized, quantized_original))

    def curve(m, ref, rows, label, thresholds):
        ref_ppl = exit_nll(ref, rows, None, batch=256).perplexity
        base = exit_nll(m, rows, None, batch=256)
        out = [{"threshold": None, "perplexity": base.perplexity, "increase_pct": 100 * (base.perplexity / ref_ppl - 1),
                "mean_blocks": base.mean_blocks, "original_perplexity": ref_ppl}]
        print(f"{label} no exits: perplexity {base.perplexity:.4f} ({out[0]['increase_pct']:+.2f}% vs the original "
              f"{ref_ppl:.4f})", flush=True)
        for t in thresholds:
            r = exit_nll(m, rows, t, batch=256, exits=check)
            out.append({"threshold": t, "perplexity": r.perplexity, "mean_blocks": r.mean_blocks,
                        "increase_pct": 100 * (r.perplexity / ref_ppl - 1), "exits": r.exits})
            print(f"{label} threshold {t}: perplexity {r.perplexity:.4f} ({out[-1]['increase_pct']:+.2f}% vs the "
                  f"original), {r.mean_blocks:.3f} blocks", flush=True)
        return out

    results = {}
    prompts = [w[:16] for w in [tok(t)["input_ids"] for t in source("tinystories").texts("evaluation")[: 4 * args.prompts]]
               if len(w) >= 16][: args.prompts]
    for name, m, ref in models:
        cal = curve(m, ref, calib, f"{name} calibration", grid)
        chosen = min((c["threshold"] for c in cal[1:] if c["increase_pct"] <= args.max_increase), default=None)
        if args.eval_grid == "all" or chosen is None:
            near = grid
        else:
            i = grid.index(chosen)
            near = grid[max(0, i - 1): i + 2]
        ev = curve(m, ref, evaluation, f"{name} evaluation", near)
        at = next((c for c in ev if c["threshold"] == chosen), ev[0])
        speed = decode_speed(m, prompts, chosen if chosen is not None else 2.0, args.new_tokens, args.rounds,
                             reference=ref, check=check)
        results[name] = {"calibration": cal, "evaluation": ev, "chosen_threshold": chosen, "at_chosen": at,
                         "speed": speed}
        if name == "fp32":
            costs = forced_costs(m, ref, prompts, args.new_tokens, args.rounds)
            tokens = evaluation.shape[0] * (evaluation.shape[1] - 1)
            results[name]["forced_exit_costs"] = costs
            results[name]["bounds"] = [{"threshold": c["threshold"], "increase_pct": c["increase_pct"],
                                        "mean_blocks": c["mean_blocks"],
                                        "speedup_bound": bound(costs, c.get("exits") or {}, tokens, 5)}
                                       for c in ev]
    if student is None:
        base = results["fp32"]
        rows = []
        for name, r in results.items():
            for c in r["evaluation"]:
                rows.append([name, "none" if c["threshold"] is None else f"{c['threshold']:g}" +
                             (" (chosen)" if c["threshold"] == r["chosen_threshold"] else ""),
                             f"{c['perplexity']:.4f}", f"{c['increase_pct']:+.2f}%", f"{c['mean_blocks']:.3f}"])
        print_table("stories260K early exit: P1 evaluation perplexity against mean blocks per token (increase vs the "
                    "original model without exits)", ["model", "threshold", "P1 ppl", "vs original", "mean blocks"],
                    rows)
        speed_rows = []
        for name, r in results.items():
            s = r["speed"]
            speed_rows.append([name, f"{r['chosen_threshold']}", f"{s['tokens_per_s']['no exits']:.0f}",
                               f"{s['tokens_per_s']['exits']:.0f}", f"{s['speedup']:.3f}x", f"{s['mean_blocks']:.2f}",
                               f"{s['tokens_per_s']['transformers']:.0f}", f"{r['at_chosen']['increase_pct']:+.2f}%"])
        print_table(f"decode at batch 1 ({args.prompts} prompts x {args.new_tokens} tokens, medians of {args.rounds} "
                    "alternating rounds), tokens/s; no exits = the original model in the same loop",
                    ["model", "threshold", "no exits", "exits", "speed-up", "mean blocks", "transformers generate",
                     "P1 vs original"], speed_rows)
        costs = base["forced_exit_costs"]
        print_table("decode at batch 1 when every token leaves at one exit (threshold 0, only that exit checked)",
                    ["exit after block", "tokens/s", "speed-up vs no exits"],
                    [["none", f"{costs['tokens_per_s']['none']:.0f}", "1.000x"]] +
                    [[k, f"{costs['tokens_per_s'][k]:.0f}", f"{v:.3f}x"] for k, v in costs["speedup_if_all_exit_at"].items()])
        print_table("the speed-up each evaluated threshold's exit distribution gives at those costs (tokens that "
                    "do not exit priced as the loop without exits: an upper bound)",
                    ["threshold", "P1 vs original", "mean blocks", "speed-up bound"],
                    [[f"{b['threshold']}", f"{b['increase_pct']:+.2f}%", f"{b['mean_blocks']:.3f}",
                      f"{b['speedup_bound']:.3f}x"] for b in base["bounds"]])
        bar = base["speed"]["speedup"] >= 1.3 and base["at_chosen"]["increase_pct"] <= 3.0
        print(f"bar (>= 1.3x decode tokens/s at batch 1, P1 within 3%): {'met' if bar else 'NOT met'} — "
              f"{base['speed']['speedup']:.3f}x at {base['at_chosen']['increase_pct']:+.2f}% "
              f"(threshold {base['chosen_threshold']}, chosen on the calibration windows)")
        out = write_json("early_exit_lm", {"environment": environment(), "settings": vars(args), "results": results,
                                           "step_curve": step_curve, "bar_met": bar,
                                           "training_seconds": trained_seconds,
                                           "seconds": time.perf_counter() - began,
                                           "threads": torch.get_num_threads()}, args.out)
        print(f"wrote {out}")
        return
    static = exit_nll(student, evaluation, None)
    from secateur.runtime.early_exit_lm import ExitLM

    student_speed, student_lm = [], ExitLM(student, None, max_len=16 + args.new_tokens)
    for p in prompts[:2]:  # warm-up
        student_lm.greedy(p, 4)
    for _ in range(args.rounds):
        tokens, seconds = 0, 0.0
        for p in prompts:
            start = time.perf_counter()
            tokens += len(student_lm.greedy(p, args.new_tokens).tokens)
            seconds += time.perf_counter() - start
        student_speed.append(tokens / seconds)
    base = results["fp32"]
    static_row = {"perplexity": static.perplexity, "increase_pct": 100 * (static.perplexity / base["evaluation"][0]["perplexity"] - 1),
                  "blocks": student.config.num_hidden_layers, "tokens_per_s": statistics.median(student_speed),
                  "speedup_vs_no_exits": statistics.median(student_speed) / base["speed"]["tokens_per_s"]["no exits"]}

    rows = []
    for name, r in results.items():
        for c in r["evaluation"]:
            rows.append([name, "none" if c["threshold"] is None else f"{c['threshold']:g}" +
                         (" (chosen)" if c["threshold"] == r["chosen_threshold"] else ""),
                         f"{c['perplexity']:.4f}", f"{c['increase_pct']:+.2f}%", f"{c['mean_blocks']:.3f}"])
    print_table("stories260K early exit: P1 evaluation perplexity against mean blocks per token",
                ["model", "threshold", "P1 ppl", "vs no exits", "mean blocks"], rows)
    speed_rows = []
    for name, r in results.items():
        s = r["speed"]
        speed_rows.append([name, f"{r['chosen_threshold']}", f"{s['tokens_per_s']['no exits']:.0f}",
                           f"{s['tokens_per_s']['exits']:.0f}", f"{s['speedup']:.3f}x", f"{s['mean_blocks']:.2f}",
                           f"{s['tokens_per_s']['transformers']:.0f}", f"{r['at_chosen']['increase_pct']:+.2f}%"])
    speed_rows.append(["static: 1 block removed + distilled", "-", "-", f"{static_row['tokens_per_s']:.0f}",
                       f"{static_row['speedup_vs_no_exits']:.3f}x", str(static_row["blocks"]), "-",
                       f"{static_row['increase_pct']:+.2f}%"])
    print_table(f"decode at batch 1 ({args.prompts} prompts x {args.new_tokens} tokens, medians of {args.rounds} "
                "alternating rounds), tokens/s",
                ["model", "threshold", "no exits", "exits", "speed-up", "mean blocks", "transformers generate",
                 "P1 vs no exits"], speed_rows)
    fp = results["fp32"]
    bar = fp["speed"]["speedup"] >= 1.3 and fp["at_chosen"]["increase_pct"] <= 3.0
    print(f"bar (>= 1.3x decode tokens/s at batch 1, P1 within 3%): {'met' if bar else 'NOT met'} — "
          f"{fp['speed']['speedup']:.3f}x at {fp['at_chosen']['increase_pct']:+.2f}% "
          f"(threshold {fp['chosen_threshold']}, chosen on the calibration windows)")
    out = write_json("early_exit_lm", {"environment": environment(), "settings": vars(args), "results": results,
                                       "static": static_row, "bar_met": bar,
                                       "seconds": time.perf_counter() - began, "threads": torch.get_num_threads()},
                     args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

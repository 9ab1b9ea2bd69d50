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
"""

from __future__ import annotations

import argparse
import copy
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


def decode_speed(model, prompts, threshold, new_tokens, rounds):
    """Tokens/s at batch 1 (medians of alternating rounds): the loop without exits, with exits, and
    transformers' generate; the mean blocks per generated token with exits."""
    import torch

    from secateur.runtime.early_exit_lm import ExitLM

    plain, exits = ExitLM(model, None, max_len=16 + new_tokens), ExitLM(model, threshold, max_len=16 + new_tokens)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps of the exit adapters")
    parser.add_argument("--max-increase", type=float, default=2.0, help="perplexity increase allowed on the "
                                                                        "calibration windows, percent")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--eval-windows", type=int, default=0, help="0: all 670 (P1)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    setup_env()

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
        recipe = Recipe.from_dict({"steps": [{"method": "early_exit", "data": ["tinystories:calibration"],
                                              "seq_len": 256, "steps": args.steps, "batch_size": 16, "lr": 3e-3,
                                              "temperature": 1.0, "eval_every": 0}]})
        compress_(loaded.model, recipe, tokenizer=tok)
        artifact = save(loaded.model, Path(tmp) / "stories-exits", tokenizer=tok, recipe=recipe)
        model = load(artifact).model
        recipe_path = Path(tmp) / "student.yaml"
        recipe_path.write_text(STUDENT.format(model=STORIES), encoding="utf-8")
        subprocess.run([sys.executable, "-c", "from secateur.cli import main; main()", "compress", str(recipe_path),
                        "--out", str(Path(tmp) / "student")], check=True, stdout=subprocess.DEVNULL)
        student = load(Path(tmp) / "student").model
    quantized = copy.deepcopy(model)
    secateur.compress_(quantized, secateur.RTNConfig(bits=4, group_size=32))

    def curve(m, rows, label):
        base = exit_nll(m, rows, None)
        out = [{"threshold": None, "perplexity": base.perplexity, "increase_pct": 0.0, "mean_blocks": base.mean_blocks}]
        for t in GRID:
            r = exit_nll(m, rows, t)
            out.append({"threshold": t, "perplexity": r.perplexity, "mean_blocks": r.mean_blocks,
                        "increase_pct": 100 * (r.perplexity / base.perplexity - 1), "exits": r.exits})
            print(f"{label} threshold {t}: perplexity {r.perplexity:.4f} ({out[-1]['increase_pct']:+.2f}%), "
                  f"{r.mean_blocks:.3f} blocks", flush=True)
        return out

    results = {}
    prompts = [w[:16] for w in [tok(t)["input_ids"] for t in source("tinystories").texts("evaluation")[: 4 * args.prompts]]
               if len(w) >= 16][: args.prompts]
    for name, m in (("fp32", model), ("w4a16", quantized)):
        cal = curve(m, calib, f"{name} calibration")
        chosen = min((c["threshold"] for c in cal[1:] if c["increase_pct"] <= args.max_increase), default=None)
        ev = curve(m, evaluation, f"{name} evaluation")
        at = next((c for c in ev if c["threshold"] == chosen), ev[0])
        speed = decode_speed(m, prompts, chosen if chosen is not None else 2.0, args.new_tokens, args.rounds)
        results[name] = {"calibration": cal, "evaluation": ev, "chosen_threshold": chosen, "at_chosen": at,
                         "speed": speed}
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

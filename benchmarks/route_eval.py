"""The confidence cascade's cost-quality curve on stories260K (issue 24, item 8).

A temporary registry gets family ``stories``: the dense stories260K (``base``, the large tier) and
its cheap variants, each tried as the small tier in turn: RTN W4 with groups of 32 (``w4``: the
smallest) and a 4-block student (``student``: the block with the least influence removed, then
300 distillation steps from the dense model, as examples/pipelines/stories-family.yaml makes it;
the cheapest to run). For each, ``secateur route-eval``'s function
(:func:`secateur.serve.routing.route_eval`) fits the cascade's threshold on calibration-split
prompts at every target escalation rate from 0 to 1 (steps of 0.05) and measures it on
evaluation-split prompts: perplexity of the true continuation under the answering variant, and the
measured time of every variant invoked (single prompts, ``--batch 1``). The gap recovered is on
log-perplexity, where random routing gives exactly the share escalated (APGR 0.5); the hindsight
area (prompts escalated in the order of their true gain) bounds what any router reaches.

Bars: APGR >= 0.6 (random routing: 0.5) and the cascade above random routing (gap recovered >
share escalated) at every target rate from 0.1 to 0.9.

    python benchmarks/route_eval.py [--small w4,student] [--calibration-prompts 200] [--eval-prompts 500]
                                    [--max-tokens 32] [--quantile 0.1] [--out PATH]

Prints each curve (naming the CPU) and writes benchmarks/results/route_eval.json.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, environment, print_table, setup_env, write_json  # noqa: E402

STORIES = SHARED / "models" / "stories260K" / "hf"
STUDENT = """name: route-eval-student
model: {model}
data: {{source: tinystories, samples: 128, seq_len: 256}}
steps:
  - {{method: structured, drop_layers: 1, mlp: 0.0}}
  - {{method: distill, data: ["tinystories:calibration"], steps: 300, lr: 2.0e-3, temperature: 1.0, eval_every: 0}}
"""
SMALL = ("w4", "student")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", default=",".join(SMALL), help="small tiers to try, comma-separated: w4, student")
    parser.add_argument("--calibration-prompts", type=int, default=200)
    parser.add_argument("--eval-prompts", type=int, default=500)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--quantile", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    smalls = [t.strip() for t in args.small.split(",") if t.strip()]
    bad = [t for t in smalls if t not in SMALL]
    if bad or not smalls:
        parser.error(f"--small: unknown tier(s) {bad}; valid: {', '.join(SMALL)}")
    setup_env()
    import secateur
    from rich.console import Console
    from secateur import artifacts
    from secateur.registry import Registry
    from secateur.serve.config import ServeConfig
    from secateur.serve.routing import route_eval, route_eval_summary, route_eval_table

    console = Console()
    results = {}
    with tempfile.TemporaryDirectory(prefix="route-eval-") as tmp:
        work = Path(tmp)
        base = artifacts.load(STORIES)
        base_dir = secateur.save(base.model, work / "base", tokenizer=base.tokenizer)
        made = {}
        if "w4" in smalls:
            small = artifacts.load(base_dir)
            secateur.compress_(small.model, secateur.RTNConfig(bits=4, group_size=32))
            made["w4"] = secateur.save(small.model, work / "w4", tokenizer=small.tokenizer)
        if "student" in smalls:
            recipe = work / "student.yaml"
            recipe.write_text(STUDENT.format(model=base_dir), encoding="utf-8")
            subprocess.run([sys.executable, "-c", "from secateur.cli import main; main()", "compress", str(recipe), "--out", str(work / "student")],
                           check=True, stdout=subprocess.DEVNULL)
            made["student"] = work / "student"
        with Registry(work / "home") as registry:
            registry.add(base_dir, family="stories", name="base")
            for name, path in made.items():
                registry.add(path, family="stories", name=name)
        for name in smalls:
            result = route_eval("stories", ServeConfig.from_dict({"tiers": {name: name, "large": "base"}}),
                                quantile=args.quantile, calibration_prompts=args.calibration_prompts,
                                eval_prompts=args.eval_prompts, max_tokens=args.max_tokens, batch=args.batch,
                                home=work / "home")
            console.print(route_eval_table(result))
            console.print(route_eval_summary(result))
            results[name] = result

    rows = [[name, r["small"]["perplexity"], r["large"]["perplexity"], r["small"]["cost_s"] / r["large"]["cost_s"],
             r["apgr"], r["hindsight_apgr"], r["apgr_ppl"], r["random_apgr_ppl"], r["beats_random_10_to_90"]]
            for name, r in results.items()]
    print_table(f"cascade small -> dense on stories260K, {args.eval_prompts} held-out prompts, quantile {args.quantile}",
                ["small tier", "ppl small", "ppl dense", "cost small / dense", "APGR (log ppl)", "hindsight bound",
                 "APGR (ppl)", "random (ppl)", "above random 0.1-0.9"], rows)
    bars = {name: {"apgr_at_least_0_6": r["apgr"] is not None and r["apgr"] >= 0.6,
                   "beats_random_10_to_90": r["beats_random_10_to_90"]} for name, r in results.items()}
    path = write_json("route_eval", {"environment": environment(), "settings": vars(args), "results": results,
                                     "bars": bars}, args.out)
    print(f"wrote {path}")
    sys.exit(0 if any(all(b.values()) for b in bars.values()) else 1)


if __name__ == "__main__":
    main()

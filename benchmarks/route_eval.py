"""The confidence cascade's cost-quality curve on stories260K (issue 24, item 8).

A temporary registry gets family ``stories``: the dense stories260K (``base``, the large tier) and
its cheapest variant, RTN W4 with groups of 32 (``w4``, the small tier). ``secateur route-eval``'s
function (:func:`secateur.serve.routing.route_eval`) then fits the cascade's threshold on
calibration-split prompts at every target escalation rate from 0 to 1 (steps of 0.05) and measures
it on evaluation-split prompts: perplexity of the true continuation under the answering variant,
and the measured time of every variant invoked (single prompts, ``--batch 1``).

Bars: APGR >= 0.6 (random routing: 0.5) and the cascade above random routing (gap recovered >
share escalated) at every target rate from 0.1 to 0.9.

    python benchmarks/route_eval.py [--calibration-prompts 200] [--eval-prompts 500] [--max-tokens 32]
                                    [--quantile 0.1] [--out PATH]

Prints the curve (naming the CPU) and writes benchmarks/results/route_eval.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, environment, print_table, setup_env, write_json  # noqa: E402

STORIES = SHARED / "models" / "stories260K" / "hf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calibration-prompts", type=int, default=200)
    parser.add_argument("--eval-prompts", type=int, default=500)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--quantile", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    setup_env()
    import secateur
    from secateur import artifacts
    from secateur.registry import Registry
    from secateur.serve.config import ServeConfig
    from secateur.serve.routing import route_eval

    with tempfile.TemporaryDirectory(prefix="route-eval-") as tmp:
        work = Path(tmp)
        base = artifacts.load(STORIES)
        base_dir = secateur.save(base.model, work / "base", tokenizer=base.tokenizer)
        small = artifacts.load(base_dir)
        secateur.compress_(small.model, secateur.RTNConfig(bits=4, group_size=32))
        small_dir = secateur.save(small.model, work / "w4", tokenizer=small.tokenizer)
        with Registry(work / "home") as registry:
            registry.add(base_dir, family="stories", name="base")
            registry.add(small_dir, family="stories", name="w4")
        result = route_eval("stories", ServeConfig.from_dict({"tiers": {"small": "w4", "large": "base"}}),
                            quantile=args.quantile, calibration_prompts=args.calibration_prompts,
                            eval_prompts=args.eval_prompts, max_tokens=args.max_tokens, batch=args.batch,
                            home=work / "home")

    rows = [[f"{c['target_rate']:.2f}", f"{c['threshold']:.4f}", c["escalated"], c["perplexity"], c["gap_recovered"],
             c["cost_s"], c["cost_vs_large"]] for c in result["curve"]]
    print_table(f"cascade w4 -> dense on stories260K: {result['prompts']['evaluation']} held-out prompts, "
                f"quantile {args.quantile}, {args.max_tokens} tokens",
                ["target rate", "threshold", "escalated", "perplexity", "gap recovered", "cost (s)", "cost / dense"],
                rows)
    bars = {"apgr_at_least_0_6": result["apgr"] is not None and result["apgr"] >= 0.6,
            "beats_random_10_to_90": result["beats_random_10_to_90"]}
    print(f"small (w4): perplexity {result['small']['perplexity']:.4f}, {result['small']['cost_s']:.2f} s; "
          f"large (dense): {result['large']['perplexity']:.4f}, {result['large']['cost_s']:.2f} s")
    print(f"APGR {result['apgr']:.3f} (random 0.5; bar 0.6: {bars['apgr_at_least_0_6']}); above random at every rate "
          f"0.1-0.9: {bars['beats_random_10_to_90']}; cost at 80% of the gap recovered: "
          f"{result['cost_at_80pct_vs_large'] if result['cost_at_80pct_vs_large'] is None else round(result['cost_at_80pct_vs_large'], 3)}"
          " x the dense model's")
    path = write_json("route_eval", {"environment": environment(), "settings": vars(args), **result, "bars": bars},
                      args.out)
    print(f"wrote {path}")
    sys.exit(0 if all(bars.values()) else 1)


if __name__ == "__main__":
    main()

"""Structured pruning speed-up, protocol P4 on the timing model: dense vs pruned in one run.

The P4 timing model (random Llama, hidden 768, intermediate 2048, 12 layers, 12 heads, vocab
32000, fp32) and its structurally pruned variants, built in this process, saved as artifacts (for
their bytes on disk) and timed in alternating rounds with secateur's P4 evaluator (batch 1,
prompt 128 tokens, 64 greedy tokens with the KV cache; prefill = the prompt's forward up to the
first token's logits). Speed-ups are medians over rounds of per-round ratios to the dense model;
"theory" is the ratio of the weights one decode step reads (every block and the head).

    python benchmarks/structured_speed.py [--rounds 3] [--threads 2] [--prompt 128] [--new 64]

Prints a table and writes benchmarks/results/structured_speed.json. Bars (issue 4): 50% of heads
and 50% of MLP channels removed gives >= 1.6x prefill and >= 1.6x decode tokens/s.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_p4_arguments, environment, print_table, setup_env, write_json  # noqa: E402

VARIANTS = {
    "dense": None,
    "heads 50% + MLP 50%": dict(heads=0.5, mlp=0.5, importance="magnitude"),
    "MLP 50%": dict(mlp=0.5, importance="magnitude"),
    "6 of 12 blocks": dict(mlp=0.0, blocks=(6, 7, 8, 9, 10, 11)),
}


def decode_weights(model) -> int:
    """Parameters one decode step reads: every block and the head (not the embedding table)."""
    from secateur.models.arch import arch_of

    arch = arch_of(model).arch
    blocks = sum(p.numel() for p in arch.get_blocks(model).parameters())
    return blocks + arch.get_head(model).weight.numel() + arch.get_final_norm(model).weight.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_p4_arguments(parser, "structured_speed")
    args = parser.parse_args()
    setup_env()
    import torch

    import secateur
    from secateur.evaluate.speed import disk_bytes, speed
    from secateur.testing import timing_model

    torch.set_num_threads(args.threads)
    dense = timing_model(seed=0)
    models, info = {}, {}
    workdir = Path(tempfile.mkdtemp(prefix="secateur-structured-speed-"))
    for name, fields in VARIANTS.items():
        model = dense if fields is None else secateur.compress_(copy.deepcopy(dense), secateur.StructuredConfig(**fields))
        path = secateur.save(model, workdir / name.replace(" ", "_").replace("%", "").replace("+", ""))
        from secateur import lineage
        result = lineage.of(model).history()[-1]["result"] if fields else None
        models[name] = model
        info[name] = {"fields": fields, "parameters": sum(p.numel() for p in model.parameters()),
                      "disk_bytes": disk_bytes(path), "decode_weights": decode_weights(model),
                      "shapes": result["after"] if result else None,
                      "standard_checkpoint": result["standard_checkpoint"] if result else True}
        print(f"built {name}: {info[name]['parameters']:,} parameters", file=sys.stderr)

    rounds: dict[str, list[dict]] = {name: [] for name in models}
    for r in range(args.rounds):
        for name, model in models.items():  # alternate: every round times every variant
            res = speed(model, prompt_len=args.prompt, new_tokens=args.new, runs=args.runs)
            rounds[name].append({"prefill_ms": res.extra["prefill_ms_median"],
                                 "decode_tokens_per_s": res.extra["decode_tokens_per_s"]})
            print(f"round {r}: {name}: prefill {res.extra['prefill_ms_median']:.1f} ms, "
                  f"decode {res.extra['decode_tokens_per_s']:.1f} tok/s", file=sys.stderr)
        settings = res.settings

    rows, results = [], {}
    base = info["dense"]
    for name in models:
        prefill = [rounds[name][i]["prefill_ms"] for i in range(args.rounds)]
        decode = [rounds[name][i]["decode_tokens_per_s"] for i in range(args.rounds)]
        prefill_x = statistics.median(rounds["dense"][i]["prefill_ms"] / prefill[i] for i in range(args.rounds))
        decode_x = statistics.median(decode[i] / rounds["dense"][i]["decode_tokens_per_s"] for i in range(args.rounds))
        theory = base["decode_weights"] / info[name]["decode_weights"]
        results[name] = {**info[name], "rounds": rounds[name], "prefill_ms_median": statistics.median(prefill),
                         "decode_tokens_per_s_median": statistics.median(decode), "prefill_speedup": prefill_x,
                         "decode_speedup": decode_x, "decode_theory": theory}
        rows.append([name, f"{info[name]['parameters'] / 1e6:.1f}M", f"{info[name]['disk_bytes'] / 2**20:.0f}",
                     statistics.median(prefill), prefill_x, statistics.median(decode), decode_x, theory])
    print_table(f"P4 timing model, batch 1, prompt {args.prompt}, {args.new} new tokens, {args.threads} threads, "
                f"fp32, {args.rounds} alternating rounds",
                ["variant", "params", "MiB on disk", "prefill ms", "prefill ×", "decode tok/s", "decode ×",
                 "decode × theory"], rows)
    bar = results["heads 50% + MLP 50%"]
    passed = bar["prefill_speedup"] >= 1.6 and bar["decode_speedup"] >= 1.6
    print(f"bar (heads 50% + MLP 50%: prefill and decode >= 1.6x): {'PASS' if passed else 'FAIL'}")
    path = write_json("structured_speed", {"environment": environment(), "settings": settings,
                                           "args": vars(args), "variants": results, "bar_passed": passed}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

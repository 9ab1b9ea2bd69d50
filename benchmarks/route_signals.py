"""Which signal could a cascade on stories260K route by? (issue 24, item 8: the APGR bar).

For each cheap variant of stories260K (RTN W4 g32, RTN W3 g32, a 4-block student distilled for 300
steps, and the last block dropped with no recovery), on the first ``--prompts`` evaluation-split
prompts of route-eval's protocol (16 prompt tokens, 32 true continuation tokens, 32 greedy answer
tokens), every candidate confidence signal the small tier has at no extra cost ranks the prompts,
and the area under the gap-recovered curve (log-perplexity, random routing = 0.5) is computed with
the prompts escalated in that order. The ranking is done on the evaluation prompts themselves, so
each figure is the best any threshold on that signal can reach there (route-eval's thresholds,
fitted on the calibration split, can only do worse). ``hindsight`` ranks by the true per-prompt gain:
the bound for any router.

Signals: a quantile (0 = the minimum, 0.1, 0.25, 0.5) or the mean of the small tier's token
log-probabilities over its greedy answer (what the gateway's cascade reads), over the prompt
(teacher-forced, which the prefill computes anyway), and over both.

    python benchmarks/route_signals.py [--prompts 500]

Prints the table and writes benchmarks/results/route_signals.json.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, environment, print_table, setup_env, write_json  # noqa: E402
from route_eval import STUDENT  # noqa: E402

STORIES = SHARED / "models" / "stories260K" / "hf"
QUANTILES = (0.0, 0.1, 0.25, 0.5)


def area_in_order(order: list[int], nll_small: list[float], nll_large: list[float]) -> float:
    """Area under the gap recovered (mean NLL) when the prompts escalate one by one in ``order``."""
    n, gap = len(order), sum(nll_small) - sum(nll_large)
    ys, recovered = [0.0], 0.0
    for i in order:
        recovered += nll_small[i] - nll_large[i]
        ys.append(recovered / gap)
    return sum((a + b) / 2 for a, b in zip(ys, ys[1:])) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=500)
    args = parser.parse_args()
    setup_env()
    import math

    import torch

    import secateur
    from secateur import artifacts
    from secateur.serve.policy import confidence
    from secateur.serve.routing import continuation_nll, greedy_answers, story_prompts

    base = artifacts.load(STORIES)
    tok = base.tokenizer
    held = story_prompts(tok, "evaluation", args.prompts, 16, 32)

    def prompt_logprobs(model):
        ids = torch.tensor([p.prompt for p in held])
        with torch.inference_mode():
            lp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
        return lp.gather(-1, ids[:, 1:, None])[..., 0].tolist()

    nll_large = continuation_nll(base.model, held)
    with tempfile.TemporaryDirectory(prefix="route-signals-") as tmp:
        recipe = Path(tmp) / "student.yaml"
        recipe.write_text(STUDENT.format(model=STORIES), encoding="utf-8")
        subprocess.run([sys.executable, "-c", "from secateur.cli import main; main()", "compress", str(recipe),
                        "--out", str(Path(tmp) / "student")], check=True, stdout=subprocess.DEVNULL)
        student = artifacts.load(Path(tmp) / "student").model

    def made(step):
        model = copy.deepcopy(base.model)
        secateur.compress_(model, step)
        return model

    smalls = {"rtn w4 g32": made(secateur.RTNConfig(bits=4, group_size=32)),
              "rtn w3 g32": made(secateur.RTNConfig(bits=3, group_size=32)),
              "student (4 blocks, distilled)": student,
              "last block dropped": made(secateur.StructuredConfig(blocks=(4,)))}
    results, rows = {}, []
    for name, model in smalls.items():
        nll_small = continuation_nll(model, held)
        answers = greedy_answers(model, tok, [p.prompt for p in held], 32)
        prompt_lps = prompt_logprobs(model)
        signals = {}
        for q in QUANTILES:
            signals[f"answer q{q}"] = [confidence(a[1], q) for a in answers]
        signals["answer mean"] = [sum(a[1]) / max(1, len(a[1])) for a in answers]
        for q in QUANTILES:
            signals[f"prompt q{q}"] = [confidence(lp, q) for lp in prompt_lps]
        signals["prompt mean"] = [sum(lp) / len(lp) for lp in prompt_lps]
        signals["both mean"] = [(sum(lp) + sum(a[1])) / (len(lp) + len(a[1])) for lp, a in zip(prompt_lps, answers)]
        areas = {k: area_in_order(sorted(range(len(v)), key=lambda i: v[i]), nll_small, nll_large)
                 for k, v in signals.items()}  # least confident first
        hindsight = area_in_order(sorted(range(len(held)), key=lambda i: nll_large[i] - nll_small[i]),
                                  nll_small, nll_large)
        best = max(areas, key=areas.get)
        mean = lambda v: sum(v) / len(v)  # noqa: E731
        results[name] = {"ppl_small": math.exp(mean(nll_small)), "ppl_large": math.exp(mean(nll_large)),
                         "areas": areas, "hindsight": hindsight, "best_signal": best}
        rows.append([name, math.exp(mean(nll_small)), areas["answer q0.1"], areas["answer mean"], areas["prompt mean"],
                     f"{areas[best]:.3f} ({best})", hindsight])
        print(name, {k: round(v, 3) for k, v in areas.items()}, f"hindsight {hindsight:.3f}", flush=True)
    print_table(f"APGR (log-perplexity; random 0.5) of each signal ranking {len(held)} held-out prompts, "
                f"dense perplexity {math.exp(sum(nll_large) / len(nll_large)):.3f}",
                ["small tier", "ppl small", "answer q0.1", "answer mean", "prompt mean", "best signal", "hindsight"],
                rows)
    path = write_json("route_signals", {"environment": environment(), "settings": vars(args), "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

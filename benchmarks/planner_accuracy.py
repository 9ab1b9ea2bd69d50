"""The resource planner's predictions against measurements (issue 23's bar: median error at most 25%
for wall time and 15% for peak RSS, over at least 8 stage configurations across methods and two
model sizes).

First this machine's cost model is measured afresh (unit prices and the probes' corrections, on
small *synthetic* models with random-token data). Then each configuration below — real models and
data (stories260K with TinyStories, all-MiniLM-L6-v2 with STS-B) and a synthetic 28M-parameter Llama
none of the probes used — is planned (:func:`secateur.planner.plan_stages`) and then run as a
pipeline builds a stage (load, calibration set, compress with a resume folder, save, verify) in a
fresh process (:func:`secateur.planner.probe.run_stage`), which reports its wall time and its own
peak resident set (VmHWM). Errors are |predicted − measured| / measured. The table also shows the
error of the memory a stage adds above the resident set every stage starts with, the harder part.

    python benchmarks/planner_accuracy.py [--only NAME ...] [--keep-cost-model]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import SHARED, environment, print_table, setup_env, write_json

STORIES = SHARED / "models" / "stories260K" / "hf"
MINILM = SHARED / "models" / "all-MiniLM-L6-v2"
MEDIUM = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
              num_key_value_heads=8, vocab_size=8192)
TS = {"source": "tinystories", "samples": 128, "seq_len": 256}
STSB = {"source": "stsb", "split": "train", "samples": 128, "seq_len": 128}

# name, model, steps, calibration (a named source, or random tokens: (samples, seq_len)), size label
CONFIGS = [
    ("stories magnitude 50%", "stories", [{"method": "magnitude", "sparsity": 0.5}], None),
    ("stories gptq w4", "stories", [{"method": "gptq", "bits": 4, "strategy": "channel"}], TS),
    ("stories sparsegpt 50%", "stories", [{"method": "sparsegpt", "sparsity": 0.5}], TS),
    ("stories wanda 2:4", "stories", [{"method": "wanda", "sparsity": 0.5, "pattern": "2:4"}], TS),
    ("stories awq w4 g32", "stories", [{"method": "awq", "bits": 4, "strategy": "group", "group_size": 32}], TS),
    ("stories structured+distill", "stories", [{"method": "structured", "drop_layers": 1, "mlp": 0.0},
                                              {"method": "distill", "steps": 100, "lr": 2e-3, "eval_every": 0}], TS),
    ("medium rtn w8", "medium", [{"method": "rtn", "bits": 8, "strategy": "channel"}], None),
    ("medium gptq w4 g128", "medium", [{"method": "gptq", "bits": 4, "strategy": "group", "group_size": 128}], (64, 256)),
    ("medium sparsegpt 50%", "medium", [{"method": "sparsegpt", "sparsity": 0.5}], (64, 256)),
    ("medium wanda 50%", "medium", [{"method": "wanda", "sparsity": 0.5}], (128, 256)),
    ("medium distill", "medium", [{"method": "distill", "steps": 10, "batch_size": 8, "seq_len": 256,
                                   "eval_every": 0}], (64, 256)),
    ("minilm smoothquant", "minilm", [{"method": "smoothquant"}], STSB),
    ("minilm gptq w8", "minilm", [{"method": "gptq", "bits": 8, "strategy": "channel"}], STSB),
    ("minilm structured+distill", "minilm", [{"method": "structured", "drop_layers": 3, "mlp": 0.0},
                                            {"method": "distill", "data": ["stsb:train"], "seq_len": 128,
                                             "steps": 40, "batch_size": 64, "dtype": "bfloat16",
                                             "eval_every": 0}], STSB),
]


def err(predicted: float, measured: float) -> float:
    return abs(predicted - measured) / measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="run only the configurations whose name contains one of these")
    parser.add_argument("--keep-cost-model", action="store_true", help="use the cached cost model if there is one")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    setup_env()

    import torch

    from secateur.planner import Data, StageSpec, cost_model, plan_stages
    from secateur.planner.probe import run_stage, synthetic_llama
    from secateur.recipe import Recipe

    torch.set_num_threads(torch.get_num_threads())
    start = time.perf_counter()
    costs = cost_model(remeasure=not args.keep_cost_model)
    print(f"cost model: measured in {costs.seconds:.0f} s (methods' corrections: "
          + ", ".join(f"{m} ×{f:.2f}" for m, f in sorted(costs.methods.items())) + ")", file=sys.stderr)
    configs = [c for c in CONFIGS if not args.only or any(o in c[0] for o in args.only)]
    rows, records = [], []
    with tempfile.TemporaryDirectory(prefix="secateur-planner-bench-") as tmp:
        models = {"stories": STORIES, "minilm": MINILM, "medium": synthetic_llama(Path(tmp) / "medium", **MEDIUM)}
        for name, which, steps, calib in configs:
            folder = models[which]
            recipe = Recipe.from_dict({"steps": steps, **({"data": calib} if isinstance(calib, dict) else {})})
            data = Data()
            if isinstance(calib, tuple):
                data = Data(*calib)
            elif isinstance(calib, dict):
                data = _named_data(folder, recipe, steps)
            plan = plan_stages(str(folder), {name: StageSpec("base", list(recipe.steps), data)}, costs,
                               available=(1e15, "benchmark"))
            predicted = plan.stages[0]
            measured = run_stage(folder, steps, data=calib if isinstance(calib, dict) else None,
                                 samples=data.samples if isinstance(calib, tuple) else 0,
                                 seq_len=data.seq_len if isinstance(calib, tuple) else 0)
            base = predicted.memory.get("process", 0.0)
            record = {"name": name, "model": which, "steps": steps, "calibration": calib if calib else None,
                      "predicted_seconds": predicted.seconds, "measured_seconds": measured["seconds"],
                      "predicted_peak_bytes": predicted.peak_bytes, "measured_peak_bytes": measured["peak_rss"],
                      "time_error": err(predicted.seconds, measured["seconds"]),
                      "rss_error": err(predicted.peak_bytes, measured["peak_rss"]),
                      # a stage that adds less than 16 MiB to the start is within the start's own noise
                      "rss_above_start_error": err(predicted.peak_bytes - base, measured["peak_rss"] - base)
                      if measured["peak_rss"] - base >= 16 << 20 else None,
                      "predicted_parts": predicted.time, "measured_parts": measured["parts"],
                      "predicted_memory": predicted.memory}
            records.append(record)
            rows.append([name, which, f"{predicted.seconds:.2f}", f"{measured['seconds']:.2f}",
                         f"{100 * record['time_error']:.0f}%", f"{predicted.peak_bytes / 2**20:.0f}",
                         f"{measured['peak_rss'] / 2**20:.0f}", f"{100 * record['rss_error']:.0f}%",
                         "—" if record["rss_above_start_error"] is None else f"{100 * record['rss_above_start_error']:.0f}%"])
            print(f"{name}: predicted {predicted.seconds:.2f} s / {predicted.peak_bytes / 2**20:.0f} MiB, measured "
                  f"{measured['seconds']:.2f} s / {measured['peak_rss'] / 2**20:.0f} MiB", file=sys.stderr)
    med_t = statistics.median(r["time_error"] for r in records)
    med_r = statistics.median(r["rss_error"] for r in records)
    med_a = statistics.median(r["rss_above_start_error"] for r in records if r["rss_above_start_error"] is not None)
    rows.append(["median", "", "", "", f"{100 * med_t:.0f}%", "", "", f"{100 * med_r:.0f}%", f"{100 * med_a:.0f}%"])
    print_table("resource planner: predicted vs measured stage wall time and peak RSS",
                ["configuration", "model", "pred s", "meas s", "time err", "pred MiB", "meas MiB", "RSS err",
                 "err above start"], rows)
    verdict = {"time": med_t <= 0.25, "rss": med_r <= 0.15}
    print(f"bar: median time error {100 * med_t:.0f}% (<= 25%: {'met' if verdict['time'] else 'NOT met'}), "
          f"median peak RSS error {100 * med_r:.0f}% (<= 15%: {'met' if verdict['rss'] else 'NOT met'}); "
          f"the memory above the {costs.base_rss.get('causal', 0) / 2**20:.0f} MiB every stage starts with: "
          f"median error {100 * med_a:.0f}%")
    out = write_json("planner_accuracy", {"environment": environment(), "cost_model": costs.to_dict(),
                                          "configs": records, "median_time_error": med_t,
                                          "median_rss_error": med_r, "median_rss_above_start_error": med_a,
                                          "bar_met": verdict, "seconds": time.perf_counter() - start}, args.out)
    print(f"wrote {out}")


def _named_data(folder: Path, recipe: object, steps: list) -> object:
    """The calibration set as the pipeline builds it (a source may hold fewer windows than asked),
    and for an encoder's training step what the pipeline's planner reads of its texts."""
    from transformers import AutoTokenizer

    from secateur.data import calibration_set, source
    from secateur.planner import Data, ModelShape, training_texts

    tokenizer = AutoTokenizer.from_pretrained(folder)
    d = recipe.data
    ids = calibration_set(d.source, tokenizer, d.samples, d.seq_len, d.seed, d.mode or source(d.source).default_mode,
                          split=d.split).input_ids
    data = Data(int(ids.shape[0]), int(ids.shape[1]))
    if ModelShape.of(folder).kind == "encoder":
        training_texts(list(recipe.steps), tokenizer, data)
    return data


if __name__ == "__main__":
    main()

"""The search's bars (issue 25): a budgeted search per model, its front checked against the bars.

- ``minilm`` (P2 dev, 60 minutes on 2 cores by default): the front must hold a variant at least 3x
  faster than dense fp32 at most 0.5 Spearman below it, and one at least 5x faster at most 2.0
  below. Speed: encoding the whole STS-B dev set (3,000 sentences, batch 64), dense and the front
  alternating (the protocol of ``benchmarks/quant_encoder_speed.py``).
- ``stories`` (P1): the front must dominate the README's single-technique rows built in the same
  run (magnitude, Wanda and SparseGPT 50%, structured heads 25% + MLP 25%, GPTQ W4 per channel):
  for each, a front member at least as good in perplexity and at least as fast in decode tokens/s
  (timed together, alternating), or, for the size front, as small in bytes. The 4-hour distilled
  4-block student of the README is not rebuilt here.

    python benchmarks/search_pareto.py --model stories --budget 30m
    python benchmarks/search_pareto.py --model minilm --budget 60m
    python benchmarks/search_pareto.py --model stories --quick      # a small space: checks the script

Prints a table and writes benchmarks/results/search_<model>.json with the CPU it ran on.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, environment, print_table, setup_env, write_json  # noqa: E402

SPACES = {
    "stories": {
        "name": "bench-stories",
        "axes": {"structured": ["none", {"drop_layers": 1, "mlp": 0.0}, {"heads": 0.25, "mlp": 0.25}],
                 "sparsity": ["none", {"method": "sparsegpt", "sparsity": [0.3, 0.5]}],
                 "quant": ["none", {"method": "gptq", "bits": [4, 8], "strategy": "channel"},
                           {"method": "gptq", "bits": 4, "group_size": 32}]},
        "trials": 14},
    "minilm": {
        "name": "bench-minilm",
        "axes": {"structured": ["none", {"drop_layers": [2, 3], "mlp": 0.0}, {"mlp": 0.25, "importance": "taylor"},
                                {"drop_layers": 2, "mlp": 0.25, "importance": "taylor"}],
                 "recovery": [0, 150],
                 "quant": ["none", {"method": "smoothquant"}]},
        "trials": 12},
}
QUICK = {"stories": {"name": "bench-stories-quick", "axes": {"quant": ["none", {"method": "rtn", "bits": 8,
                                                                                  "strategy": "channel"}]},
                     "trials": 1},
         "minilm": {"name": "bench-minilm-quick", "axes": {"quant": ["none", {"method": "smoothquant"}]}, "trials": 1}}
SINGLE = {  # the README's single-technique rows (stories260K, P1)
    "magnitude 50%": [{"method": "magnitude", "sparsity": 0.5}],
    "wanda 50%": [{"method": "wanda", "sparsity": 0.5}],
    "sparsegpt 50%": [{"method": "sparsegpt", "sparsity": 0.5}],
    "structured heads 25% + MLP 25%": [{"method": "structured", "heads": 0.25, "mlp": 0.25}],
    "GPTQ W4 per channel": [{"method": "gptq", "bits": 4, "strategy": "channel"}],
}


def encode_seconds(models: dict, tokenizer, rounds: int) -> dict:
    """Median seconds to encode the STS-B dev sentences (both sides, batch 64), alternating."""
    import torch

    from secateur.data import source
    from secateur.evaluate.sts import sentence_embeddings

    first, second, _ = source("stsb").pairs("dev")
    texts = list(first) + list(second)
    times: dict = {n: [] for n in models}
    with torch.inference_mode():
        for m in models.values():
            sentence_embeddings(m, tokenizer, texts[:128])
        for _ in range(rounds):
            for name, m in models.items():
                start = time.perf_counter()
                sentence_embeddings(m, tokenizer, texts)
                times[name].append(time.perf_counter() - start)
    return {n: statistics.median(t) for n, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["stories", "minilm"], required=True)
    parser.add_argument("--budget", default=None, help="default: 30m (stories), 60m (minilm)")
    parser.add_argument("--quick", action="store_true", help="a one-candidate space: checks the script runs")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workdir", default="runs/bench-search")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    setup_env()
    import torch

    from secateur.artifacts import load
    from secateur.search import SearchSpace, search

    torch.set_num_threads(2)
    base = SHARED / "models" / ("stories260K/hf" if args.model == "stories" else "all-MiniLM-L6-v2")
    kind = "causal" if args.model == "stories" else "encoder"
    raw = (QUICK if args.quick else SPACES)[args.model]
    space = SearchSpace.from_dict(raw, kind)
    budget = args.budget or ("5m" if args.quick else "30m" if args.model == "stories" else "60m")
    start = time.perf_counter()
    result = search(str(base), space, budget=budget, workdir=args.workdir)
    search_seconds = time.perf_counter() - start
    front = [result.point(c) for c in result.front]
    rows, bars = [], {}
    if args.model == "minilm":
        from secateur.runtime import optimize_

        loaded = load(base)
        models = {"dense": optimize_(loaded.model)}
        for p in front:
            models[p["label"]] = optimize_(load(_artifact(result, p["id"])).model)
        seconds = encode_seconds(models, loaded.tokenizer, args.rounds)
        for p in front:
            p["encode_speedup"] = seconds["dense"] / seconds[p["label"]]
            rows.append([p["label"], f"{p['measured']['quality']:.3f}", f"{p['measured']['quality_drop']:+.3f}",
                         f"{p['encode_speedup']:.2f}x", f"{p['measured']['bytes']:.2f}x"])
        bars = {"3x at <= 0.5 below": any(p["encode_speedup"] >= 3 and p["measured"]["quality_drop"] <= 0.5 for p in front),
                "5x at <= 2.0 below": any(p["encode_speedup"] >= 5 and p["measured"]["quality_drop"] <= 2.0 for p in front)}
        columns = ["front member", "STS-B dev", "drop", "encode speed-up (dev set)", "bytes"]
    else:
        singles = _singles(base, args.workdir) if not args.quick else {}
        from secateur.pipeline.gates import measure_speed
        from secateur.runtime import optimize_

        names = ["dense"] + [p["label"] for p in front] + list(singles)
        paths = [str(base)] + [_artifact(result, p["id"]) for p in front] + [s["artifact"] for s in singles.values()]
        timed = measure_speed([optimize_(load(x).model) for x in paths], rounds=args.rounds)
        tps = {n: t["decode_tokens_per_s"] for n, t in zip(names, timed)}
        reference = next((p["measured"]["quality_reference"] for p in result.points if p["measured"]), float("nan"))
        rows.append(["dense", f"{reference:.3f}", f"{tps['dense']:.0f}", "1.00x", ""])
        for p in front:
            p["decode_tokens_per_s"] = tps[p["label"]]
            rows.append(["front: " + p["label"], f"{p['measured']['quality']:.3f}", f"{tps[p['label']]:.0f}",
                         f"{p['measured']['bytes']:.2f}x", ""])
        for name, s in singles.items():
            # the latency front: as good and at least as fast (timed together); the size front: as good and
            # at most as many bytes as the row stored at its smallest (sparse rows as bitmasks, as in the README)
            on_speed = [p["label"] for p in front if p["measured"]["quality"] <= s["quality"] and tps[p["label"]] >= tps[name]]
            on_size = [p["label"] for p in front if p["measured"]["quality"] <= s["quality"] and
                       p["measured"]["bytes"] <= s["bytes_smallest"]]
            bars[f"dominates {name}"] = bool(on_speed or on_size)
            rows.append([name, f"{s['quality']:.3f}", f"{tps[name]:.0f}", f"{s['bytes_smallest']:.2f}x",
                         "speed: " + (", ".join(on_speed) or "—") + "; size: " + (", ".join(on_size) or "—")])
        columns = ["variant", "P1 perplexity", "decode tok/s (together)", "bytes (smallest storage)", "dominated by"]
    print_table(f"search {args.model}: {result.coverage['measured']} of {result.candidates} candidates measured "
                f"in {search_seconds / 60:.1f} min", columns, rows)
    print("proxy rank correlation (Spearman):", result.correlation)
    for name, ok in bars.items():
        print(f"bar {name}: {'met' if ok else 'NOT met'}")
    write_json(f"search_{args.model}{'_quick' if args.quick else ''}", {
        "environment": environment(), "budget": budget, "search_seconds": search_seconds,
        "coverage": result.coverage, "correlation": result.correlation, "front": front, "rows": rows, "bars": bars,
        "aliases": result.aliases, "points": result.points}, args.out)


def _artifact(result, cid: str) -> str:
    import json

    for line in (Path(result.folder) / "trials.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["id"] == cid and record.get("ok"):
            return record["result"]["artifact"]
    raise KeyError(cid)


def _singles(base: Path, workdir: str) -> dict:
    """The README's single-technique rows, built as one pipeline (cached across runs)."""
    from secateur.artifacts import verify
    from secateur.pipeline import Pipeline, run_pipeline

    spec = {"name": "bench-singles", "base": str(base), "data": {"source": "tinystories", "samples": 128, "seq_len": 256},
            "eval": [{"task": "perplexity", "data": "tinystories"}], "speed": False,
            "variants": {f"v{i}": {"steps": steps} for i, steps in enumerate(SINGLE.values())}}
    result = run_pipeline(Pipeline.from_dict(spec), workdir, keep_going=True)
    base_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    out = {}
    for i, name in enumerate(SINGLE):
        stage = result.stages[f"v{i}"]
        card = verify(stage.artifact)
        size = sum(e["bytes"] for n, e in card["files"].items() if n.endswith(".safetensors"))
        out[name] = {"artifact": stage.artifact, "quality": stage.evaluations[0]["value"], "bytes": size / base_bytes,
                     "bytes_smallest": min(size, _bitmask_bytes(stage.artifact)) / base_bytes}
    return out


def _bitmask_bytes(artifact: str) -> int:
    """The weights' bytes when the same model is saved with sparse weights stored as bitmasks."""
    import tempfile

    import secateur
    from secateur.artifacts import load

    loaded = load(artifact)
    with tempfile.TemporaryDirectory() as tmp:
        secateur.save(loaded.model, Path(tmp) / "a", tokenizer=loaded.tokenizer, sparse="auto")
        return sum(f.stat().st_size for f in (Path(tmp) / "a").glob("*.safetensors"))


if __name__ == "__main__":
    main()

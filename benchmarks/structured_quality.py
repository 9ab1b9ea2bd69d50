"""Structured pruning quality with no training: depth and width importances side by side.

P2 (MiniLM, calibration: STS-B train sentences, 128 × 128; metric: STS-B dev Spearman × 100):
  1. depth — keep 3 of 6 layers, chosen by each depth importance, plus hand-picked layer sets;
     the bar: the auto choice (influence) reaches >= 80.0.
  2. width — 25% / 50% of MLP channels and 25% / 50% of heads removed, by each width importance.
P1 (stories260K, calibration: the 128 × 256 P1 windows; metric: TinyStories perplexity):
  3. one block removed (each depth importance), 25% of MLP channels and one KV group of heads
     (4 → 3, gqa groups) removed (each width importance).

Every variant starts from a freshly loaded dense model. The variants the distillation work starts
from are saved as artifacts (with tokenizer) under --save, reloaded with secateur.load and
re-evaluated; the JSON records whether the reloaded metric equals the in-memory one.

    python benchmarks/structured_quality.py [--save runs/structured]

Prints one table per section and writes benchmarks/results/structured_quality.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, SHARED, environment, print_table, setup_env, write_json  # noqa: E402

DEPTH = ("influence", "loss", "taylor", "magnitude")
WIDTH = ("magnitude", "activation", "taylor")
AUTO_DEPTH = "influence"  # what depth_importance="auto" resolves to
DEPTH_BAR = 80.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Bench:
    """One model under one protocol: dense reference, calibration set, and a runner for variants."""

    def __init__(self, name: str, path: Path, task: str, data: str, eval_options: dict, calib_args: tuple,
                 calib_options: dict, higher_is_better: bool):
        import secateur
        from secateur.data import calibration_set
        from secateur.evaluate import evaluate

        self.name, self.path, self.task, self.data, self.eval_options = name, path, task, data, eval_options
        self.higher_is_better = higher_is_better
        start = time.perf_counter()
        model, self.tokenizer, _ = secateur.load(path)
        self.calib = calibration_set(calib_args[0], self.tokenizer, *calib_args[1:], **calib_options)
        result = evaluate(model, self.tokenizer, task, data, **eval_options)
        self.dense, self.dense_protocol = result.value, result.protocol
        self.dense_parameters = sum(p.numel() for p in model.parameters())
        log(f"[{name}] dense {self.metric_name} {self.dense:.3f} ({time.perf_counter() - start:.1f}s)")

    @property
    def metric_name(self) -> str:
        return "spearman" if self.task == "sts" else "ppl"

    def evaluate(self, model: Any, tokenizer: Any = None) -> float:
        from secateur.evaluate import evaluate

        return evaluate(model, tokenizer or self.tokenizer, self.task, self.data, **self.eval_options).value

    def run(self, label: str, **fields: Any) -> tuple[dict[str, Any], Any]:
        """Load the dense model, compress it with ``StructuredConfig(**fields)``, evaluate."""
        import secateur
        from secateur import StructuredConfig

        start = time.perf_counter()
        model, _, _ = secateur.load(self.path)
        config = StructuredConfig(**fields)
        t0 = time.perf_counter()
        secateur.compress_(model, config, data=self.calib)
        compress_seconds = time.perf_counter() - t0
        value = self.evaluate(model)
        seconds = time.perf_counter() - start
        from secateur import lineage
        report = lineage.of(model).history()[-1]["result"]
        before, after = report["before"], report["after"]
        row = {
            "variant": label, "config": {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()},
            self.metric_name: value, "delta_vs_dense": value - self.dense,
            "kept_blocks": report.get("kept_blocks"), "removed_blocks": report.get("removed_blocks"),
            "block_scores": report.get("block_scores"), "importance": report.get("importance"),
            "depth_importance": report.get("depth_importance"),
            "parameters_before": before["parameters"], "parameters_after": after["parameters"],
            "parameters_ratio": report.get("parameters_ratio"),
            "shape_after": {k: after.get(k) for k in ("layers", "hidden", "heads", "kv_heads", "head_dim",
                                                      "intermediate")},
            "standard_checkpoint": report.get("standard_checkpoint"),
            "compress_seconds": round(compress_seconds, 3), "wall_seconds": round(seconds, 3),
        }
        log(f"[{self.name}] {label}: {self.metric_name} {value:.3f} "
            f"(params {after['parameters']:,}, {seconds:.1f}s)")
        return row, model

    def best(self, candidates: dict[str, tuple[dict, Any]]) -> str:
        pick = max if self.higher_is_better else min
        return pick(candidates, key=lambda k: candidates[k][0][self.metric_name])

    def save(self, name: str, row: dict, model: Any, root: Path) -> dict[str, Any]:
        """Save ``model`` as an artifact, reload it, and re-evaluate."""
        import secateur

        out = secateur.save(model, root / name, tokenizer=self.tokenizer,
                            metrics={"after": {f"{self.task}:{self.data}": row[self.metric_name]}},
                            extra={"benchmark": "benchmarks/structured_quality.py", "variant": row["variant"]})
        loaded, tokenizer, _ = secateur.load(out)
        value = self.evaluate(loaded, tokenizer)
        facts = {"artifact": name, "path": str(out), "variant": row["variant"], "in_memory": row[self.metric_name],
                 "reloaded": value, "equal": value == row[self.metric_name],
                 "abs_diff": abs(value - row[self.metric_name]), "standard_checkpoint": row["standard_checkpoint"],
                 "parameters": row["parameters_after"]}
        log(f"[{self.name}] saved {name}: reloaded {value:.4f} vs in-memory {row[self.metric_name]:.4f} "
            f"({'equal' if facts['equal'] else 'DIFFERENT'})")
        return facts


def fmt_blocks(blocks: list[int] | None) -> str | None:
    return None if blocks is None else "-".join(map(str, blocks))


def fmt_scores(scores: list[float] | None) -> str | None:
    return None if scores is None else " ".join(f"{s:.4g}" for s in scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save", default="runs/structured", help="where the pruned variants are saved as artifacts")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/structured_quality.json)")
    args = parser.parse_args()
    setup_env()
    import torch

    torch.set_num_threads(2)
    save_root = Path(args.save)
    if not save_root.is_absolute():
        save_root = REPO / save_root
    results: dict[str, Any] = {"environment": environment(), "save_dir": str(save_root)}
    artifacts: list[dict[str, Any]] = []

    # --- P2 MiniLM ------------------------------------------------------------------------------
    minilm = Bench("MiniLM", SHARED / "models" / "all-MiniLM-L6-v2", "sts", "stsb", {"split": "dev"},
                   ("stsb", 128, 128), {"split": "train"}, higher_is_better=True)
    p2: dict[str, Any] = {"dense": minilm.dense, "protocol": minilm.dense_protocol,
                          "dense_parameters": minilm.dense_parameters, "calibration": minilm.calib.to_dict()}

    # 1. depth: keep 3 of 6
    depth_runs: dict[str, tuple[dict, Any]] = {}
    for method in DEPTH:
        depth_runs[method] = minilm.run(f"drop 3 by {method}", drop_layers=3, mlp=0.0, depth_importance=method)
    hand = {"hand: keep 0-1-2": (3, 4, 5), "hand: keep 0-2-4": (1, 3, 5), "hand: keep 1-3-5": (0, 2, 4)}
    hand_rows = [minilm.run(label, blocks=blocks, mlp=0.0)[0] for label, blocks in hand.items()]
    auto_row = depth_runs[AUTO_DEPTH][0]
    passed = auto_row["spearman"] >= DEPTH_BAR
    p2["depth"] = {"bar": {"depth_importance": AUTO_DEPTH, "threshold": DEPTH_BAR, "spearman": auto_row["spearman"],
                           "kept_blocks": auto_row["kept_blocks"], "passed": passed},
                   "runs": [r for r, _ in depth_runs.values()] + hand_rows}
    rows = [["dense", "0-1-2-3-4-5", minilm.dense, None, minilm.dense_parameters, None, None]]
    for r in p2["depth"]["runs"]:
        rows.append([r["variant"], fmt_blocks(r["kept_blocks"]), r["spearman"], r["delta_vs_dense"],
                     r["parameters_after"], fmt_scores(r["block_scores"]), r["wall_seconds"]])
    print_table("1. Depth, P2 MiniLM: keep 3 of 6 layers, no training (STS-B dev Spearman × 100, higher is better)",
                ["variant", "kept layers", "spearman", "Δ vs dense", "parameters", "block scores (0..5)", "seconds"],
                rows)
    print(f"depth bar ({AUTO_DEPTH} >= {DEPTH_BAR}): {'PASS' if passed else 'FAIL'} — "
          f"{auto_row['spearman']:.2f}, kept layers {fmt_blocks(auto_row['kept_blocks'])}")
    artifacts.append(minilm.save("minilm-3of6", auto_row, depth_runs[AUTO_DEPTH][1], save_root))
    del depth_runs

    # 2. width
    width_rows, mlp50 = [], {}
    for unit, fractions in (("mlp", (0.25, 0.5)), ("heads", (0.25, 0.5))):
        for fraction in fractions:
            for method in WIDTH:
                fields = {"mlp": fraction} if unit == "mlp" else {"heads": fraction, "mlp": 0.0}
                row, model = minilm.run(f"{unit} {fraction:.0%} {method}", importance=method, **fields)
                row.update(unit=unit, fraction=fraction, method=method)
                width_rows.append(row)
                if unit == "mlp" and fraction == 0.5:
                    mlp50[method] = (row, model)
                else:
                    del model
    winners = {}
    for unit in ("mlp", "heads"):
        for fraction in (0.25, 0.5):
            group = [r for r in width_rows if r["unit"] == unit and r["fraction"] == fraction]
            winners[f"{unit} {fraction:.0%}"] = max(group, key=lambda r: r["spearman"])["method"]
    p2["width"] = {"runs": width_rows, "best_importance": winners}
    rows = [["dense", "—", minilm.dense, minilm.dense, minilm.dense, minilm.dense_parameters]]
    for unit in ("mlp", "heads"):
        for fraction in (0.25, 0.5):
            by = {r["method"]: r for r in width_rows if r["unit"] == unit and r["fraction"] == fraction}
            any_row = next(iter(by.values()))
            rows.append([f"{unit} {fraction:.0%} removed", winners[f"{unit} {fraction:.0%}"],
                         *(by[m]["spearman"] for m in WIDTH), any_row["parameters_after"]])
    print_table("2. Width, P2 MiniLM, no training (STS-B dev Spearman × 100, higher is better)",
                ["removed", "best", *WIDTH, "parameters"], rows)
    best = minilm.best(mlp50)
    artifacts.append(minilm.save(f"minilm-mlp50-{best}", mlp50[best][0], mlp50[best][1], save_root))
    del mlp50
    results["p2"] = p2

    # --- P1 stories260K ---------------------------------------------------------------------------
    stories = Bench("stories260K", SHARED / "models" / "stories260K" / "hf", "perplexity", "tinystories", {},
                    ("tinystories", 128, 256), {}, higher_is_better=False)
    p1: dict[str, Any] = {"dense": stories.dense, "protocol": stories.dense_protocol,
                          "dense_parameters": stories.dense_parameters, "calibration": stories.calib.to_dict()}
    groups = {
        "drop1": [(m, {"drop_layers": 1, "mlp": 0.0, "depth_importance": m}) for m in DEPTH],
        "mlp25": [(m, {"mlp": 0.25, "importance": m}) for m in WIDTH],
        "kv1": [(m, {"heads": 0.25, "mlp": 0.0, "gqa": "groups", "importance": m}) for m in WIDTH],
    }
    titles = {"drop1": "(a) one block removed", "mlp25": "(b) 25% of MLP channels", "kv1": "(c) one KV group (4 → 3)"}
    rows = [["dense", "—", stories.dense, 1.0, stories.dense_parameters, None, True, None]]
    p1_runs: dict[str, list[dict]] = {}
    for group, variants in groups.items():
        runs = {m: stories.run(f"{group} {m}", **fields) for m, fields in variants}
        for m, (r, _) in runs.items():
            r["method"] = m
        p1_runs[group] = [r for r, _ in runs.values()]
        for m, (r, _) in runs.items():
            detail = (f"kept {fmt_blocks(r['kept_blocks'])}; scores {fmt_scores(r['block_scores'])}" if group == "drop1"
                      else f"heads {r['shape_after']['heads'][0]}, kv {r['shape_after']['kv_heads']}" if group == "kv1"
                      else f"intermediate {r['shape_after']['intermediate'][0]}")
            rows.append([titles[group], m, r["ppl"], r["ppl"] / stories.dense, r["parameters_after"], detail,
                         r["standard_checkpoint"], r["wall_seconds"]])
        pick = AUTO_DEPTH if group == "drop1" else stories.best(runs)
        artifacts.append(stories.save(f"stories260K-{group}-{pick}", runs[pick][0], runs[pick][1], save_root))
        del runs
    p1.update(p1_runs)
    p1["best_importance"] = {g: min(p1_runs[g], key=lambda r: r["ppl"])["method"]
                             for g in ("mlp25", "kv1")}
    results["p1"] = p1
    print_table("3. stories260K, P1 TinyStories perplexity, no training (lower is better)",
                ["variant", "importance", "ppl", "× dense", "parameters", "shape / block scores (0..4)",
                 "standard ckpt", "seconds"], rows)

    results["artifacts"] = artifacts
    print_table(f"Saved artifacts (reloaded with secateur.load) under {save_root}",
                ["artifact", "variant", "in-memory", "reloaded", "equal", "standard ckpt", "parameters"],
                [[a["artifact"], a["variant"], a["in_memory"], a["reloaded"], a["equal"], a["standard_checkpoint"],
                  a["parameters"]] for a in artifacts])
    print(f"wrote {write_json('structured_quality', results, args.out)}")


if __name__ == "__main__":
    main()

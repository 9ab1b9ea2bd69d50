"""The demo: compress the real models end to end and show what it cost and what it won.

For each model (stories260K, a real Llama; all-MiniLM-L6-v2, a real BERT encoder): evaluate the
dense model (quality by its protocol, speed and memory by P4), run each recipe (evaluate again,
save an artifact with its compression card, reload it with hash verification), and print one
before/after table. Everything lands in ``OUT/demo.json`` too.

The table is honest about unstructured sparsity: stored as bitmask + values it shrinks the
checkpoint, but dense kernels run no faster on zeros; the speed ratios are measured, not assumed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# (label, model folder under --models, quality eval, calibration data, variants: (label, step or steps))
_UNSTRUCTURED = tuple((f"{m} 50%", {"method": m, "sparsity": 0.5}) for m in ("magnitude", "wanda", "sparsegpt"))
CASES: tuple[dict[str, Any], ...] = (
    {"label": "stories260K", "path": "stories260K/hf", "quality": {"task": "perplexity", "data": "tinystories"},
     "data": {"source": "tinystories", "samples": 128, "seq_len": 256},            # P1 calibration windows
     "variants": _UNSTRUCTURED + (
         ("structured heads 25% + MLP 25%", {"method": "structured", "heads": 0.25, "mlp": 0.25,
                                             "importance": "activation"}),
         ("GPTQ W4 per channel", {"method": "gptq", "bits": 4, "strategy": "channel"}),
         ("1 block removed + distilled", [{"method": "structured", "mlp": 0.0, "drop_layers": 1},
                                          {"method": "distill", "data": ["tinystories:calibration"], "steps": 300,
                                           "lr": 2e-3, "temperature": 1.0, "eval_every": 0}]))},
    {"label": "all-MiniLM-L6-v2", "path": "all-MiniLM-L6-v2", "quality": {"task": "sts", "data": "stsb"},
     "data": {"source": "stsb", "split": "train", "samples": 128, "seq_len": 128},  # STS-B train sentences
     "variants": _UNSTRUCTURED + (
         ("structured 3 of 6 layers", {"method": "structured", "mlp": 0.0, "drop_layers": 3}),  # ShortGPT
         ("SmoothQuant W8A8", {"method": "smoothquant"}),
         ("3 of 6 layers + distilled", [{"method": "structured", "mlp": 0.0, "drop_layers": 3},
                                        {"method": "distill", "data": ["stsb:train"], "seq_len": 128, "steps": 150,
                                         "batch_size": 64, "dtype": "bfloat16", "eval_every": 0}]))},
)
SPEED_OPTIONS = {"prompt_len": 128, "new_tokens": 32, "runs": 10}
SPEED_ROUNDS = 3  # dense and variants measured alternately, median over rounds (P4: compare in one run)


def _row(label: str, variant: str, quality: dict[str, Any], speed: dict[str, Any], dense: dict[str, Any] | None,
         artifact: str | None) -> dict[str, Any]:
    row = {"model": label, "variant": variant, "protocol": quality["protocol"], "metric": quality["metric"],
           "quality": quality["value"], "artifact": artifact, **speed}
    if dense is not None:
        row["quality_change_pct"] = 100.0 * (row["quality"] / dense["quality"] - 1.0)
        for key, ratio, better_high in (("prefill_ms", "prefill_speedup", False),
                                        ("decode_tok_s", "decode_speedup", True),
                                        ("bytes_on_disk", "size_ratio", True)):
            if row.get(key) and dense.get(key):
                row[ratio] = row[key] / dense[key] if better_high else dense[key] / row[key]
    return row


def measure_speed(models: list[Any]) -> list[dict[str, Any]]:
    """P4 speed of several models in the runtime's fastest eager form, alternating between them
    round by round; medians over rounds (the pipeline's gates measure the same way)."""
    from .pipeline.gates import measure_speed as alternate
    from .runtime import optimize_

    out = []
    for m in alternate([optimize_(model) for model in models], SPEED_ROUNDS, SPEED_OPTIONS):
        out.append({"prefill_ms": m.get("prefill_ms_median", m.get("latency_ms_median")),
                    "decode_tok_s": m.get("decode_tokens_per_s"), "sparsity": m.get("sparsity"),
                    "params": m.get("parameters"), "bytes_on_disk": m.get("disk_bytes"),
                    "peak_rss_mib": m["peak_rss_mib"], "kernels": m["settings"].get("kernels") or {}})
    return out


def run_demo(models_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Run every case; return (and write to ``out_dir/demo.json``) the rows of the table."""
    from .api import get_method
    from .errors import SecateurError
    from .artifacts import load
    from .pipeline import run_recipe
    from .runtime import machine
    from .recipe import Recipe

    models_dir, out_dir = Path(models_dir), Path(out_dir)
    rows: list[dict[str, Any]] = []
    for case in CASES:
        path = models_dir / case["path"]
        if not path.is_dir():
            raise SecateurError(f"demo model folder '{path}' does not exist; --models must hold "
                                "stories260K/hf and all-MiniLM-L6-v2")
        dense_quality, variants = None, []
        for label, variant in case["variants"]:
            name = f"{case['label']}-" + "".join(c if c.isalnum() else "-" for c in label).strip("-")
            steps = variant if isinstance(variant, list) else [variant]
            spec = {"name": name, "model": str(path), "steps": steps, "eval": [case["quality"]]}
            if any(get_method(s["method"]).needs_data or s["method"] == "structured" for s in steps):
                spec["data"] = case["data"]  # structured: activation and depth scores read it
            result = run_recipe(Recipe.from_dict(spec), out=out_dir / name, evaluate_before=dense_quality is None,
                                storage="sparse")
            dense_quality = dense_quality or result.before[0]
            variants.append((label, result))
        # reload every artifact (hashes verified) and time it against the dense model, alternating
        models = [load(path).model] + [load(r.artifact).model for _, r in variants]
        speeds = measure_speed(models)
        dense = _row(case["label"], "dense", dense_quality, speeds[0], None, None)
        rows.append(dense)
        for (label, result), speed in zip(variants, speeds[1:]):
            rows.append(_row(case["label"], label, result.after[0], speed, dense, result.artifact))
    summary = {"rows": rows, "speed": {**SPEED_OPTIONS, "rounds": SPEED_ROUNDS}, "machine": machine.describe()}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "demo.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (out_dir / "demo.md").write_text(markdown_table(rows))
    print_table(rows, summary["machine"])
    return summary


def _weights_bytes(directory: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))


def _cells(r: dict[str, Any]) -> list[str]:
    def fmt(value: Any, spec: str, suffix: str = "") -> str:
        return "—" if value is None else format(value, spec) + suffix

    return [r["model"], r["variant"], f"{r['quality']:.3f} {r['protocol'] or ''}".strip(),
            fmt(r.get("quality_change_pct"), "+.1f", "%"), fmt(r["sparsity"], ".1%"),
            fmt(r["bytes_on_disk"] / 1e6 if r["bytes_on_disk"] else None, ".2f", " MB"), fmt(r.get("size_ratio"), ".2f"),
            fmt(r["prefill_ms"], ".2f"), fmt(r.get("prefill_speedup"), ".2f"), fmt(r["decode_tok_s"], ".0f"),
            fmt(r.get("decode_speedup"), ".2f")]


COLUMNS = ("model", "variant", "quality", "Δ", "sparsity", "disk", "size ×", "prefill ms", "prefill ×",
           "decode tok/s", "decode ×")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def kernel_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One line per variant that ran quantized kernels: each operation's kernel by token bucket."""
    lines = []
    for r in rows:
        used = r.get("kernels") or {}
        if used:
            ops = "; ".join(f"{op} " + ", ".join(f"{b} tok: {k}" for b, k in by.items()) for op, by in used.items())
            lines.append(f"{r['model']} {r['variant']}: {ops}")
    return lines


def print_table(rows: list[dict[str, Any]], machine: dict[str, Any] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    title = "secateur demo: before / after (P1 perplexity: lower is better; P2 Spearman: higher)"
    if machine:
        title += f"\n{machine['cpu']}, {machine['threads']} threads, {'AMX' if machine['amx'] else 'no AMX'}"
    table = Table(title=title)
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("model", "variant") else "right", overflow="fold")
    for r in rows:
        table.add_row(*_cells(r))
    console = Console(width=max(Console().width, 140))
    console.print(table)
    console.print("Pruned weights are stored as bitmask + values (size ×: bytes against the dense checkpoint); they "
                  "still run on dense kernels, so expect speed × near 1.00 (measured above, same process, alternating). "
                  "Speed wins come from structured pruning and quantization.")
    lines = kernel_lines(rows)
    if lines:
        console.print("Kernels chosen by measurement on this machine (secateur info --machine):", highlight=False)
        for line in lines:
            console.print("  " + line, highlight=False, markup=False)

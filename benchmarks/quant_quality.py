"""Quantization quality on the real models, with the true bytes of the packed checkpoints.

P1 (stories260K, calibration: the first 128 P1 windows of 256 tokens): RTN W8/W4/W3, GPTQ W4/W3,
AWQ W4, mixed precision at 3.5 bits, all per output channel (stories260K's widths, 64 and 172, are
not multiples of 128), symmetric unless said. P2 (MiniLM, calibration: 128 × 128 tokens of STS-B
train sentences): SmoothQuant W8A8 and GPTQ W4A16 (group 128 with per-channel fallback). Every
variant is saved as an artifact (compressed-tensors layout) and the bytes of its safetensors are
reported; quality is measured on the quantized model as it runs (its kernels).

    python benchmarks/quant_quality.py

Prints tables and writes benchmarks/results/quant_quality.json. Reference figures from the issue:
llm-compressor on P1: RTN W4 per-channel 6.43, GPTQ W4 6.08.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, environment, print_table, setup_env, write_json  # noqa: E402

P1 = [
    ("RTN W8", "rtn", dict(bits=8, strategy="channel")),
    ("RTN W8 (MSE clip)", "rtn", dict(bits=8, strategy="channel", observer="mse")),
    ("RTN W8 asym", "rtn", dict(bits=8, strategy="channel", symmetric=False)),
    ("RTN W4", "rtn", dict(bits=4, strategy="channel")),
    ("GPTQ W4", "gptq", dict(bits=4, strategy="channel")),
    ("AWQ W4", "awq", dict(bits=4, strategy="channel")),
    ("mixed 3.5 bits (GPTQ 3/4)", "mixed", dict(strategy="channel", avg_bits=3.5)),
    ("RTN W3", "rtn", dict(bits=3, strategy="channel")),
    ("GPTQ W3", "gptq", dict(bits=3, strategy="channel")),
]
P2 = [
    ("SmoothQuant W8A8", "smoothquant", dict()),
    ("RTN W8A8 (no smoothing)", "rtn", dict(bits=8, strategy="channel", activations="int8")),
    ("GPTQ W4A16 g128", "gptq", dict(bits=4, group_size=128)),
]


def run(model_dir: Path, variants: list, task: str, data: str, calib_spec: tuple, dense_value: float) -> list[dict]:
    import secateur
    from secateur.api import get_method
    from secateur.data import calibration_set
    from secateur.evaluate import evaluate
    from secateur.runtime import optimize_

    _, tok, _ = secateur.load(model_dir)
    source, samples, seq_len, split = calib_spec
    calib = calibration_set(source, tok, samples, seq_len, split=split)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, method, fields in variants:
            model, tok, _ = secateur.load(model_dir)
            start = time.perf_counter()
            secateur.compress_(model, get_method(method).config(**fields), data=calib)
            seconds = time.perf_counter() - start
            value = evaluate(optimize_(model), tok, task, data).value  # W8A8 encoders: fused blocks
            path = secateur.save(model, Path(tmp) / label.replace(" ", "_").replace("/", "-"), tokenizer=tok)
            card = secateur.load(path).info["card"]
            q = card.get("quantization") or {}
            weights = sum(int(e["bytes"]) for n, e in card["files"].items() if n.endswith(".safetensors"))
            result = card["history"][-1]["result"]
            rows.append({"variant": label, "method": method, "fields": fields, "value": value,
                         "change_pct": 100 * (value / dense_value - 1), "seconds": seconds,
                         "weights_bytes": weights, "avg_bits": result.get("avg_bits"),
                         "quantized_layers": len(q.get("layers", {})), "quantization": q})
            print(f"{label}: {value:.4f} ({seconds:.1f} s, {weights:,} bytes)", file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    setup_env()
    import torch

    import secateur
    from secateur.evaluate import evaluate

    torch.set_num_threads(2)
    stories = SHARED / "models" / "stories260K" / "hf"
    minilm = SHARED / "models" / "all-MiniLM-L6-v2"
    model, tok, _ = secateur.load(stories)
    dense_p1 = evaluate(model, tok, "perplexity", "tinystories").value
    dense_p1_bytes = sum(p.stat().st_size for p in stories.glob("*.safetensors"))
    p1 = run(stories, P1, "perplexity", "tinystories", ("tinystories", 128, 256, None), dense_p1)
    model, tok, _ = secateur.load(minilm)
    dense_p2 = evaluate(model, tok, "sts", "stsb").value
    dense_p2_bytes = sum(p.stat().st_size for p in minilm.glob("*.safetensors"))
    p2 = run(minilm, P2, "sts", "stsb", ("stsb", 128, 128, "train"), dense_p2)

    for title, dense, dense_bytes, rows in (("P1 stories260K perplexity (lower is better)", dense_p1, dense_p1_bytes, p1),
                                            ("P2 MiniLM STS-B dev Spearman (higher is better)", dense_p2, dense_p2_bytes, p2)):
        table = [["dense fp32", "—", dense, 0.0, dense_bytes, 1.0, None]]
        table += [[r["variant"], r["method"], r["value"], r["change_pct"], r["weights_bytes"],
                   r["weights_bytes"] / dense_bytes, r["seconds"]] for r in rows]
        print_table(title, ["variant", "method", "value", "Δ %", "bytes", "bytes ×", "seconds"], table)
    gptq4 = next(r["value"] for r in p1 if r["variant"] == "GPTQ W4")
    gptq3 = next(r["value"] for r in p1 if r["variant"] == "GPTQ W3")
    mixed = next(r["value"] for r in p1 if r["variant"].startswith("mixed"))
    print(f"mixed precision: {mixed:.3f}, |- GPTQ W4| = {abs(mixed - gptq4):.3f}, |- GPTQ W3| = {abs(mixed - gptq3):.3f}")
    path = write_json("quant_quality", {"environment": environment(), "dense": {"P1": dense_p1, "P2": dense_p2},
                                        "P1": p1, "P2": p2}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

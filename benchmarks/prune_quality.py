"""Calibrated pruning quality: magnitude vs Wanda vs SparseGPT, side by side with llm-compressor.

P1 (stories260K, calibration: the 128 × 256 P1 windows): 50% unstructured, 2:4 and 4:8.
P2 (MiniLM, calibration: STS-B train sentences, 128 × 128): 50% unstructured.

    python benchmarks/prune_quality.py [--llmc]    # --llmc also runs llm-compressor (own venv)

Prints a table and writes benchmarks/results/prune_quality.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, SHARED, environment, print_table, setup_env, write_json  # noqa: E402

SETTINGS = [("50%", {"sparsity": 0.5}), ("2:4", {"pattern": "2:4"}), ("4:8", {"pattern": "4:8"})]
LLMC_PYTHON = REPO / "benchmarks" / ".venv-llmc" / "bin" / "python"


def ours(model_dir: Path, method: str, fields: dict, calib, task: str, data: str) -> tuple[float, float, dict]:
    """Prune, evaluate, and save with sparse storage: (quality, seconds, storage facts)."""
    import secateur
    from secateur.api import get_method
    from secateur.evaluate import evaluate

    model, tokenizer, _ = secateur.load(model_dir)
    extra = {"scope": "matrix"} if method == "magnitude" and "pattern" not in fields else {}
    config = get_method(method).config(**fields, **extra)
    start = time.perf_counter()
    secateur.compress_(model, config, data=calib)
    seconds = time.perf_counter() - start
    value = evaluate(model, tokenizer, task, data).value
    with tempfile.TemporaryDirectory() as tmp:
        path = secateur.save(model, Path(tmp) / "artifact", sparse="auto")
        card = json.loads((path / "compression.json").read_text())
        reloaded = secateur.load(path).model
        identical = all(torch_equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))
    return value, seconds, {**card["storage"], "reload_bit_identical": identical}


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def theirs(model_dir: Path, method: str, fields: dict, calib_file: Path, task: str, data: str) -> float | None:
    import secateur
    from secateur.evaluate import evaluate

    if not LLMC_PYTHON.exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [str(LLMC_PYTHON), str(REPO / "benchmarks" / "llmcompressor" / "run_prune.py"), "--model", str(model_dir),
               "--calib", str(calib_file), "--method", method, "--sparsity", str(fields.get("sparsity", 0.5)),
               "--out", f"{tmp}/model", "--json", f"{tmp}/result.json"]
        if "pattern" in fields:
            cmd += ["--pattern", fields["pattern"]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"llm-compressor {method} {fields} failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return None
        model, tokenizer, _ = secateur.load(f"{tmp}/model")
        return evaluate(model, tokenizer, task, data).value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llmc", action="store_true", help="also run llm-compressor (benchmarks/llmcompressor/setup.sh)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    setup_env()
    import secateur
    from safetensors.torch import save_file
    from secateur.data import calibration_set
    from secateur.evaluate import evaluate

    rows, results = [], {"environment": environment(), "p1": {}, "p2": {}}
    stories = SHARED / "models" / "stories260K" / "hf"
    model, tokenizer, _ = secateur.load(stories)
    calib = calibration_set("tinystories", tokenizer, 128, 256)
    dense = evaluate(model, tokenizer, "perplexity", "tinystories").value
    results["p1"] = {"dense": dense, "calibration": calib.to_dict(), "runs": []}
    rows.append(["P1 stories260K", "dense", dense, None, None, 1.0, None])
    with tempfile.TemporaryDirectory() as tmp:
        calib_file = Path(tmp) / "calib.safetensors"
        save_file({"input_ids": calib.input_ids.contiguous()}, str(calib_file))
        for label, fields in SETTINGS:
            for method in ("magnitude", "wanda", "sparsegpt"):
                value, seconds, storage = ours(stories, method, fields, calib, "perplexity", "tinystories")
                ref = theirs(stories, method, fields, calib_file, "perplexity", "tinystories") if args.llmc else None
                ratio = value / ref if ref else None
                rows.append(["P1 stories260K", f"{method} {label}", value, ref, ratio, storage["ratio"],
                             storage["reload_bit_identical"]])
                results["p1"]["runs"].append({"method": method, "setting": label, "ppl": value, "llmc_ppl": ref,
                                              "ratio_to_llmc": ratio, "seconds": seconds, "storage": storage})

    minilm = SHARED / "models" / "all-MiniLM-L6-v2"
    model, tokenizer, _ = secateur.load(minilm)
    calib = calibration_set("stsb", tokenizer, 128, 128, split="train")
    dense = evaluate(model, tokenizer, "sts", "stsb").value
    results["p2"] = {"dense": dense, "calibration": calib.to_dict(), "runs": []}
    rows.append(["P2 MiniLM", "dense", dense, None, None, 1.0, None])
    for method in ("magnitude", "wanda", "sparsegpt"):
        value, seconds, storage = ours(minilm, method, {"sparsity": 0.5}, calib, "sts", "stsb")
        rows.append(["P2 MiniLM", f"{method} 50%", value, None, None, storage["ratio"], storage["reload_bit_identical"]])
        results["p2"]["runs"].append({"method": method, "setting": "50%", "spearman": value, "seconds": seconds,
                                      "storage": storage})

    print_table("Calibrated pruning quality (P1: perplexity, lower is better; P2: Spearman, higher is better)",
                ["protocol", "variant", "secateur", "llm-compressor", "secateur / llmc", "bytes vs dense",
                 "reload identical"], rows)
    print(f"wrote {write_json('prune_quality', results, args.out)}")


if __name__ == "__main__":
    main()

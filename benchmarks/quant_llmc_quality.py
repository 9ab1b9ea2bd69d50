"""Weight-quantization quality side by side with llm-compressor on P1 (stories260K perplexity).

Calibration: ``calibration_set("tinystories", tok, 128, 256)`` (the P1 windows); secateur gets the
set, llm-compressor the same token ids through a safetensors file. Schemes, all symmetric, per
output channel (stories260K's widths, 64 and 172, are not multiples of 128), Linear layers of the
decoder blocks, lm_head left alone:

    RTN W4     secateur RTNConfig(bits=4, strategy="channel")  vs  llm-compressor QuantizationModifier
    GPTQ W4    secateur GPTQConfig(bits=4, strategy="channel") vs  llm-compressor GPTQModifier
    GPTQ W3    the same at 3 bits

GPTQ is compared three ways, because the two tools' defaults differ in column order: each tool's
defaults (secateur: columns in order; llm-compressor 0.14: ``actorder="static"``, columns by
decreasing Hessian diagonal with the scales fixed from the original weights), both with activation
order (secateur ``act_order=True``), and both without (llm-compressor ``actorder=None``).

Every model is scored with secateur's P1 evaluator; llm-compressor's compressed-tensors checkpoints
are read with ``secateur.load`` (stock ``AutoModelForCausalLM.from_pretrained`` is the fallback, and
the record says which loader read each one).

    python benchmarks/quant_llmc_quality.py [--threads 2]

Prints a table and writes benchmarks/results/quant_llmc_quality.json. Issue reference numbers
(llm-compressor on P1): RTN W4 per-channel 6.43, GPTQ W4 6.08. Bar: secateur GPTQ W4 within 1% of
llm-compressor's GPTQ W4 or better.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, SHARED, environment, print_table, setup_env, write_json  # noqa: E402

LLMC_PYTHON = REPO / "benchmarks" / ".venv-llmc" / "bin" / "python"
RUNNER = REPO / "benchmarks" / "llmcompressor" / "run_quant.py"
RUNS = REPO / "benchmarks" / ".cache" / "llmc-quant"  # checkpoints kept for inspection (git-ignored)

# label, secateur method, secateur fields, llm-compressor method, scheme, llm-compressor actorder
ROWS = [
    ("RTN W4", "rtn", dict(bits=4, strategy="channel"), "rtn", "W4A16-channel", None),
    ("GPTQ W4 (defaults)", "gptq", dict(bits=4, strategy="channel"), "gptq", "W4A16-channel", "default"),
    ("GPTQ W4 (act order both)", "gptq", dict(bits=4, strategy="channel", act_order=True), "gptq", "W4A16-channel",
     "default"),
    ("GPTQ W4 (in order both)", "gptq", dict(bits=4, strategy="channel"), "gptq", "W4A16-channel", "none"),
    ("RTN W3", "rtn", dict(bits=3, strategy="channel"), "rtn", "W3A16-channel", None),
    ("GPTQ W3 (defaults)", "gptq", dict(bits=3, strategy="channel"), "gptq", "W3A16-channel", "default"),
    ("GPTQ W3 (act order both)", "gptq", dict(bits=3, strategy="channel", act_order=True), "gptq", "W3A16-channel",
     "default"),
    ("GPTQ W3 (in order both)", "gptq", dict(bits=3, strategy="channel"), "gptq", "W3A16-channel", "none"),
]
ISSUE_REFERENCE = {"RTN W4": 6.43, "GPTQ W4 (defaults)": 6.08}


def ours(model_dir: Path, method: str, fields: dict, calib) -> dict:
    import secateur
    from secateur.api import get_method
    from secateur.evaluate import evaluate

    model, tok, _ = secateur.load(model_dir)
    config = get_method(method).config(**fields)
    start = time.perf_counter()
    secateur.compress_(model, config, data=calib if method != "rtn" else None)
    seconds = time.perf_counter() - start
    value = evaluate(model, tok, "perplexity", "tinystories").value
    return {"ppl": value, "seconds": seconds, "config": {"method": method, **fields}}


def evaluate_checkpoint(path: Path) -> tuple[float, str, str | None]:
    """P1 perplexity of a checkpoint written by llm-compressor: (ppl, loader, why secateur.load failed)."""
    import secateur
    from secateur.evaluate import evaluate

    try:
        model, tok, _ = secateur.load(path)
        return evaluate(model, tok, "perplexity", "tinystories").value, "secateur.load", None
    except Exception as exc:  # noqa: BLE001 - fall back to stock transformers and record why
        why = f"{type(exc).__name__}: {exc}"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    return evaluate(model, tok, "perplexity", "tinystories").value, "transformers.from_pretrained", why


def theirs(model_dir: Path, method: str, scheme: str, actorder: str | None, calib_file: Path, threads: int,
           cache: dict) -> dict | None:
    key = (method, scheme, actorder)
    if key in cache:
        return cache[key]
    if not LLMC_PYTHON.exists():
        return None
    name = f"stories-{method}-{scheme}" + (f"-actorder-{actorder}" if actorder else "")
    out, record_file = RUNS / name, RUNS / f"{name}.json"
    cmd = [str(LLMC_PYTHON), str(RUNNER), "--model", str(model_dir), "--method", method, "--scheme", scheme,
           "--out", str(out), "--json", str(record_file), "--threads", str(threads)]
    if method == "gptq":
        cmd += ["--calib", str(calib_file), "--actorder", actorder or "default"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    (RUNS / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        print(f"llm-compressor {name} failed: {proc.stderr.strip().splitlines()[-3:]}", file=sys.stderr)
        cache[key] = None
        return None
    record = json.loads(record_file.read_text())
    ppl, loader, why = evaluate_checkpoint(out)
    mod = record["settings"]["modifier_args"]
    cache[key] = {"ppl": ppl, "loader": loader, "secateur_load_error": why, "seconds": record["oneshot_wall_s"],
                  "checkpoint": str(out), "format": record["saved"].get("format"),
                  "weights_bytes": record["saved"].get("weights_bytes"),
                  "modifier": record["settings"]["modifier"], "modifier_args": mod,
                  "quantized_modules": record["quantized_modules"]["count"], "versions": record["versions"]}
    print(f"llm-compressor {name}: {ppl:.4f} ({loader})", file=sys.stderr)
    return cache[key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-llmc", action="store_true", help="secateur only")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    setup_env()
    import torch
    from safetensors.torch import save_file

    import secateur
    from secateur.data import calibration_set
    from secateur.evaluate import evaluate

    torch.set_num_threads(args.threads)
    stories = SHARED / "models" / "stories260K" / "hf"
    model, tok, _ = secateur.load(stories)
    dense = evaluate(model, tok, "perplexity", "tinystories").value
    calib = calibration_set("tinystories", tok, 128, 256)
    RUNS.mkdir(parents=True, exist_ok=True)
    calib_file = RUNS / "stories260K-calib-128x256.safetensors"
    save_file({"input_ids": calib.input_ids.contiguous()}, str(calib_file))

    cache: dict = {}
    runs, table = [], [["dense fp32", "—", dense, dense, 1.0, None, None]]
    for label, method, fields, lmethod, scheme, actorder in ROWS:
        mine = ours(stories, method, fields, calib)
        ref = None if args.no_llmc else theirs(stories, lmethod, scheme, actorder, calib_file, args.threads, cache)
        ratio = mine["ppl"] / ref["ppl"] if ref else None
        lorder = {"default": "static (default)", "none": "None", None: "—"}[actorder]
        sorder = "act_order" if fields.get("act_order") else ("in order" if method == "gptq" else "—")
        runs.append({"variant": label, "secateur": mine, "llmcompressor": ref, "ratio": ratio,
                     "secateur_column_order": sorder, "llmc_actorder": lorder,
                     "issue_reference_llmc": ISSUE_REFERENCE.get(label)})
        table.append([label, f"{sorder} / {lorder}", mine["ppl"], ref and ref["ppl"], ratio,
                      ISSUE_REFERENCE.get(label), ref and ref["loader"]])
        print(f"{label}: secateur {mine['ppl']:.4f}" + (f", llm-compressor {ref['ppl']:.4f}" if ref else ""),
              file=sys.stderr)

    print_table("P1 stories260K perplexity, per-channel symmetric weight quantization (lower is better)",
                ["variant", "column order (secateur / llmc)", "secateur", "llm-compressor", "secateur / llmc",
                 "issue ref (llmc)", "llmc checkpoint read by"], table)
    gptq = next(r for r in runs if r["variant"] == "GPTQ W4 (defaults)")
    bar = None
    if gptq["llmcompressor"]:
        bar = {"secateur": gptq["secateur"]["ppl"], "llmcompressor": gptq["llmcompressor"]["ppl"],
               "ratio": gptq["ratio"], "passes": gptq["ratio"] <= 1.01}
        print(f"bar: secateur GPTQ W4 {bar['secateur']:.4f} vs llm-compressor {bar['llmcompressor']:.4f} "
              f"(ratio {bar['ratio']:.4f}, needs <= 1.01): {'pass' if bar['passes'] else 'FAIL'}")
    data = {"environment": environment(), "threads": args.threads, "dense": dense, "calibration": calib.to_dict(),
            "protocol": "P1", "bar": bar, "runs": runs}
    print(f"wrote {write_json('quant_llmc_quality', data, args.out)}")


if __name__ == "__main__":
    main()

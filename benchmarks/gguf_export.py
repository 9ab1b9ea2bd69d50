"""stories260K exported to GGUF and run in llama.cpp: P1 perplexity beside secateur's, per type.

For the dense model in F32, F16, Q8_0 and Q4_0, and for two secateur variants whose integers are
Q8_0's and Q4_0's own scheme (RTN W8 and GPTQ W4, symmetric, groups of 32: carried over, not
requantized), the P1 windows (TinyStories validation, 512 tokens) are scored by secateur (the
variant as it runs in secateur) and by llama.cpp (llama-cpp-python, logits of every position of
each window). Printed: both perplexities, their relative difference, the file size, and which
tensors were carried or requantized.

    python benchmarks/gguf_export.py [--max-windows N]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import SHARED, environment, print_table, setup_env, write_json

STORIES = SHARED / "models" / "stories260K" / "hf"


def llama_cpp_ppl(path: Path, windows) -> float:
    from llama_cpp import Llama

    length = windows.shape[1]
    llm = Llama(model_path=str(path), n_ctx=length, logits_all=True, verbose=False, n_threads=2, n_batch=length,
                type_k=0, type_v=0)  # a float32 KV cache: the file's precision, not the cache's, is measured
    total, count = 0.0, 0
    for window in windows.tolist():
        llm.reset()
        llm.eval(window)
        logits = np.array(llm.scores[: length - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        total -= float(logp[np.arange(length - 1), window[1:]].sum())
        count += length - 1
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-windows", type=int, default=None, help="score only the first windows (quick run)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    setup_env()

    import torch

    from secateur.api import compress_
    from secateur.artifacts import load, save
    from secateur.artifacts.gguf import export_gguf
    from secateur.data import source
    from secateur.data.calibration import paragraph_stream
    from secateur.evaluate.perplexity import window_nll
    from secateur.recipe import Recipe

    start = time.perf_counter()
    tokenizer = load(STORIES).tokenizer
    stream = paragraph_stream(tokenizer, source("tinystories").texts(source("tinystories").eval_split))
    n = len(stream) // 512 if args.max_windows is None else min(len(stream) // 512, args.max_windows)
    windows = torch.tensor(stream[: n * 512], dtype=torch.long).view(n, 512)
    rows, records = [], []
    with tempfile.TemporaryDirectory(prefix="secateur-gguf-") as tmp:
        variants = {"dense": STORIES}
        for name, step in (("rtn-w8-g32", {"method": "rtn", "bits": 8, "strategy": "group", "group_size": 32}),
                           ("gptq-w4-g32", {"method": "gptq", "bits": 4, "strategy": "group", "group_size": 32})):
            loaded = load(STORIES)
            data = None
            if step["method"] == "gptq":
                from secateur.data import calibration_set

                data = calibration_set("tinystories", loaded.tokenizer, 128, 256)
            compress_(loaded.model, Recipe.from_dict({"steps": [step]}), data=data)
            variants[name] = save(loaded.model, Path(tmp) / name, tokenizer=loaded.tokenizer)
        plan = [("dense", t) for t in ("f32", "f16", "q8_0", "q4_0")] + [("rtn-w8-g32", "q8_0"), ("gptq-w4-g32", "q4_0")]
        ours = {}
        for name, kind in plan:
            if name not in ours:
                model = load(variants[name]).model
                ours[name] = math.exp(float(window_nll(model, windows).sum()) / (n * 511))
            out = export_gguf(variants[name], Path(tmp) / f"{name}-{kind}.gguf", kind)
            record = json.loads(out.with_name(out.name + ".json").read_text())
            hows = {}
            for t in record["tensors"].values():
                key = t["how"].split(" (")[0]
                hows[key] = hows.get(key, 0) + 1
            theirs = llama_cpp_ppl(out, windows)
            records.append({"variant": name, "type": kind, "secateur_ppl": ours[name], "llama_cpp_ppl": theirs,
                            "relative_difference": theirs / ours[name] - 1, "bytes": out.stat().st_size,
                            "tensors": hows})
            rows.append([name, kind, f"{ours[name]:.4f}", f"{theirs:.4f}", f"{100 * (theirs / ours[name] - 1):+.2f}%",
                         f"{out.stat().st_size / 1e6:.2f} MB", ", ".join(f"{k} {v}" for k, v in sorted(hows.items()))])
    print_table(f"stories260K in llama.cpp (GGUF) against secateur: P1 perplexity on {n} windows of 512",
                ["variant", "GGUF type", "secateur PPL", "llama.cpp PPL", "difference", "file", "tensors"], rows)
    out = write_json("gguf_export", {"environment": environment(), "windows": n, "results": records,
                                     "seconds": time.perf_counter() - start}, args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""ONNX exports in ONNX Runtime against secateur: MiniLM W8A8 quality and encode speed, stories260K P1 and decode.

**MiniLM** (P2: STS-B dev, batch 64, max_length 128, fp32 inputs): the SmoothQuant W8A8 variant
(calibrated on 128 STS-B train windows of 128 tokens, as benchmarks/quant_encoder_speed.py does),
exported with ``secateur export --format onnx``; its Spearman in ONNX Runtime (embeddings straight
from the graph's ``sentence_embedding`` output) beside the variant's in secateur (fused runtime,
``runtime.optimize_``). Bar: within 0.1. Encode speed, one run, variants alternating, 2 threads each
(torch and ONNX Runtime): torch fp32, secateur W8A8 in its fused runtime, the W8A8 export and the
fp32 export in ONNX Runtime; batch 64 over the whole dev set (3,000 sentences) and batch 1 over
its first ``--single`` sentences; reported as speed-ups over torch fp32.

**stories260K** (P1: TinyStories validation, 512-token windows): perplexity of the dense and
GPTQ W4 (groups of 32, P1 calibration) exports in ONNX Runtime beside secateur's (reference path
for the variant, i.e. the same dequantized weights; and its default kernels); and greedy decode speed
with the KV cache (P4: 128-token prompt, 64 new tokens, batch 1, tokens/s over the decode
steps) in ONNX Runtime vs secateur eager, alternating.

    python benchmarks/onnx_export.py [--rounds 2] [--single 300] [--max-windows N] [--max-pairs N]

Prints the tables (naming the CPU) and writes benchmarks/results/onnx_export.json.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, environment, print_table, setup_env, write_json  # noqa: E402

MINILM = SHARED / "models" / "all-MiniLM-L6-v2"
STORIES = SHARED / "models" / "stories260K" / "hf"
THREADS = 2


def onnx_embeddings(sess, tokenizer, texts, batch=64, max_length=128):
    """P2 embeddings from the export's ``sentence_embedding`` output, batched and padded exactly as
    secateur.evaluate.sts.sentence_embeddings does."""
    from secateur.runtime import ort_session

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for start in range(0, len(texts), batch):
        encoded = tokenizer(texts[start:start + batch], truncation=True, max_length=max_length)["input_ids"]
        width = max(len(ids) for ids in encoded)
        ids = np.full((len(encoded), width), pad, dtype=np.int64)
        mask = np.zeros((len(encoded), width), dtype=np.int64)
        for row, seq in enumerate(encoded):
            ids[row, :len(seq)] = seq
            mask[row, :len(seq)] = 1
        out.append(ort_session.embed(sess, ids, mask)["sentence_embedding"])
    return np.concatenate(out)


def spearman(a, b, gold) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr((np.asarray(a) * np.asarray(b)).sum(-1).astype(np.float64), gold)[0]) * 100


def onnx_ppl(sess, windows, batch=8) -> float:
    from secateur.runtime import ort_session

    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch):
        chunk = windows[start:start + batch]
        logits, _ = ort_session.step(sess, chunk, ort_session.empty_cache(sess, chunk.shape[0]))
        logits = logits[:, :-1].astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        target = chunk[:, 1:]
        total -= float(np.take_along_axis(logp, target[..., None], -1).sum())
        count += target.size
    return math.exp(total / count)


def minilm(args, tmp: Path) -> dict:
    import torch

    from secateur.api import compress_
    from secateur.artifacts import load, save
    from secateur.artifacts.onnx import export_onnx
    from secateur.data import calibration_set, source
    from secateur.evaluate import evaluate
    from secateur.evaluate.sts import sentence_embeddings
    from secateur.quant.smoothquant import SmoothQuantConfig
    from secateur.runtime import optimize_, ort_session

    dense, tok, _ = load(MINILM)
    w8a8 = copy.deepcopy(dense)
    compress_(w8a8, SmoothQuantConfig(), data=calibration_set("stsb", tok, 128, 128, split="train"))
    artifact = save(w8a8, tmp / "minilm-w8a8", tokenizer=tok)
    exports = {"w8a8": export_onnx(artifact, tmp / "minilm-w8a8-onnx"), "fp32": export_onnx(MINILM, tmp / "minilm-onnx")}
    fused = optimize_(load(artifact).model)
    sessions = {k: ort_session.session(p, THREADS) for k, p in exports.items()}
    first, second, gold = source("stsb").pairs("dev")
    pairs = args.max_pairs or len(gold)
    first, second, gold = list(first)[:pairs], list(second)[:pairs], list(gold)[:pairs]
    options = {"max_pairs": args.max_pairs} if args.max_pairs else {}
    quality = {"torch fp32": evaluate(dense, tok, "sts", "stsb", **options).value,
               "secateur W8A8 (fused runtime)": evaluate(fused, tok, "sts", "stsb", **options).value}
    for key, label in (("w8a8", "ONNX Runtime W8A8 export"), ("fp32", "ONNX Runtime fp32 export")):
        quality[label] = spearman(onnx_embeddings(sessions[key], tok, first),
                                  onnx_embeddings(sessions[key], tok, second), gold)
    runners = {"torch fp32": lambda texts, b: sentence_embeddings(dense, tok, texts, b),
               "secateur W8A8 (fused runtime)": lambda texts, b: sentence_embeddings(fused, tok, texts, b),
               "ONNX Runtime W8A8 export": lambda texts, b: onnx_embeddings(sessions["w8a8"], tok, texts, b),
               "ONNX Runtime fp32 export": lambda texts, b: onnx_embeddings(sessions["fp32"], tok, texts, b)}
    texts = first + second
    single = texts[:args.single]
    for run in runners.values():  # warm-up: secateur measures and packs its kernels on first use, ORT plans
        run(texts[:64], 64)
        run(texts[:8], 1)
    times = {name: {64: [], 1: []} for name in runners}
    for r in range(args.rounds):
        for name, run in runners.items():
            for b, batch_texts in ((64, texts), (1, single)):
                start = time.perf_counter()
                run(batch_texts, b)
                times[name][b].append(time.perf_counter() - start)
            print(f"round {r}: {name}: batch 64 {times[name][64][-1]:.2f} s, batch 1 {times[name][1][-1]:.2f} s",
                  file=sys.stderr)
    base = {b: statistics.median(times["torch fp32"][b]) for b in (64, 1)}
    rows, results = [], {}
    for name in runners:
        med = {b: statistics.median(times[name][b]) for b in (64, 1)}
        results[name] = {"spearman": quality[name], "seconds_batch64": times[name][64], "seconds_batch1": times[name][1],
                         "speedup_batch64": base[64] / med[64], "speedup_batch1": base[1] / med[1]}
        rows.append([name, quality[name], quality[name] - quality["secateur W8A8 (fused runtime)"],
                     med[64], base[64] / med[64], med[1], base[1] / med[1]])
    print_table(f"P2 MiniLM STS-B dev in ONNX Runtime and secateur: Spearman; encode {len(texts)} sentences at batch 64 "
                f"and {len(single)} at batch 1, {THREADS} threads, {args.rounds} alternating rounds",
                ["variant", "Spearman", "Δ vs secateur W8A8", "s (b64)", "speed-up b64", "s (b1)", "speed-up b1"], rows)
    gap = abs(quality["ONNX Runtime W8A8 export"] - quality["secateur W8A8 (fused runtime)"])
    print(f"bar (W8A8 export within 0.1 of the secateur variant): {'PASS' if gap <= 0.1 else 'FAIL'} ({gap:.3f})")
    return {"variants": results, "p2_gap": gap, "bar_passed": gap <= 0.1, "sentences_batch64": len(texts),
            "sentences_batch1": len(single)}


def stories(args, tmp: Path) -> dict:
    import torch

    from secateur.api import compress_
    from secateur.artifacts import load, save
    from secateur.artifacts.onnx import export_onnx
    from secateur.data import calibration_set, source
    from secateur.data.calibration import paragraph_stream
    from secateur.evaluate.perplexity import window_nll
    from secateur.evaluate.speed import greedy_decode
    from secateur.recipe import Recipe
    from secateur.runtime import ort_session
    from secateur.runtime.linear import reference_only

    loaded = load(STORIES)
    tok = loaded.tokenizer
    stream = paragraph_stream(tok, source("tinystories").texts(source("tinystories").eval_split))
    n = len(stream) // 512 if args.max_windows is None else min(len(stream) // 512, args.max_windows)
    windows = torch.tensor(stream[: n * 512], dtype=torch.long).view(n, 512)
    gptq = load(STORIES)
    compress_(gptq.model, Recipe.from_dict({"steps": [{"method": "gptq", "bits": 4, "group_size": 32}]}),
              data=calibration_set("tinystories", tok, 128, 256))
    variants = {"dense": STORIES, "gptq-w4-g32": save(gptq.model, tmp / "gptq", tokenizer=tok)}
    ppl_rows, records, models, sessions = [], {}, {}, {}
    for name, path in variants.items():
        model = load(path).model
        models[name] = model
        sessions[name] = ort_session.session(export_onnx(path, tmp / f"{name}-onnx"), THREADS)
        with reference_only():
            reference = math.exp(float(window_nll(model, windows).sum()) / (n * 511))
        kernels = math.exp(float(window_nll(model, windows).sum()) / (n * 511))
        theirs = onnx_ppl(sessions[name], windows.numpy())
        records[name] = {"secateur_reference_ppl": reference, "secateur_ppl": kernels, "onnx_ppl": theirs,
                         "relative_difference_vs_reference": theirs / reference - 1}
        ppl_rows.append([name, f"{reference:.5f}", f"{kernels:.5f}", f"{theirs:.5f}",
                         f"{100 * (theirs / reference - 1):+.4f}%"])
    print_table(f"P1 stories260K: perplexity of the ONNX export in ONNX Runtime on {n} windows of 512",
                ["variant", "secateur (reference path)", "secateur (kernels)", "ONNX Runtime", "ONNX vs reference"],
                ppl_rows)
    prompt = windows[0, :128].unsqueeze(0)
    new = 64
    steps = {(name, who): [] for name in variants for who in ("secateur eager", "ONNX Runtime")}
    same = {}
    for name in variants:  # warm-up
        greedy_decode(models[name], prompt, 4)
        ort_session.greedy_decode(sessions[name], prompt[0].tolist(), 4)
    for r in range(args.rounds):
        for name in variants:
            ours, _, s = greedy_decode(models[name], prompt, new)
            steps[(name, "secateur eager")].append(sum(s))
            logits, cache = ort_session.step(sessions[name], prompt.numpy(), ort_session.empty_cache(sessions[name]))
            token, got, total = int(logits[0, -1].argmax()), [], 0.0
            got.append(token)
            for _ in range(new):
                start = time.perf_counter()
                logits, cache = ort_session.step(sessions[name], np.asarray([[token]]), cache)
                token = int(logits[0, -1].argmax())
                total += time.perf_counter() - start
                got.append(token)
            steps[(name, "ONNX Runtime")].append(total)
            same[name] = got == ours[0].tolist()
    decode_rows = []
    for name in variants:
        eager = new / statistics.median(steps[(name, "secateur eager")])
        onnx_tps = new / statistics.median(steps[(name, "ONNX Runtime")])
        records[name].update({"decode_tokens_per_s_secateur_eager": eager, "decode_tokens_per_s_onnx": onnx_tps,
                              "decode_ratio_onnx_over_eager": onnx_tps / eager, "same_greedy_tokens": same[name]})
        decode_rows.append([name, eager, onnx_tps, onnx_tps / eager, str(same[name])])
    print_table(f"P4 stories260K greedy decode with the KV cache: prompt 128, {new} new tokens, batch 1, "
                f"{THREADS} threads, {args.rounds} alternating rounds",
                ["variant", "secateur eager tok/s", "ONNX Runtime tok/s", "ratio", "same tokens"], decode_rows)
    return {"windows": n, "variants": records}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--single", type=int, default=300, help="sentences encoded one at a time (batch 1)")
    parser.add_argument("--max-windows", type=int, default=None, help="P1: score only the first windows (quick run)")
    parser.add_argument("--max-pairs", type=int, default=None, help="P2: score only the first pairs (quick run)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    setup_env()
    import onnxruntime
    import torch

    torch.set_num_threads(THREADS)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="secateur-onnx-") as tmp:
        encoder = minilm(args, Path(tmp))
        causal = stories(args, Path(tmp))
    out = write_json("onnx_export", {"environment": {**environment(), "onnxruntime": onnxruntime.__version__},
                                     "rounds": args.rounds, "minilm": encoder, "stories260K": causal,
                                     "seconds": time.perf_counter() - start}, args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

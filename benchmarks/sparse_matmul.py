"""Does unstructured sparsity make a matmul faster on this CPU?

Times a dense ``torch.nn.functional.linear`` against torch's CSR sparse kernels on the shapes of
the P4 timing model's Linear layers (Llama, hidden 768, intermediate 2048):

    q/k/v/o_proj  768 x 768      gate/up_proj  2048 x 768      down_proj  768 x 2048

at 50 %, 70 % and 90 % random unstructured sparsity, fp32, for 1 token (decode) and 512 tokens
(prefill). The dense side runs the *same pruned weight* stored densely, so both sides compute the
same product and only the storage/kernel differs.

CSR paths (all timed; the table names the fastest per row and the overall winner):

    sparse.mm   torch.sparse.mm(W_csr, x.T).T
    mm          torch.mm(W_csr, x.T).T
    linear      F.linear(x, W_csr)

The results of ``sparse.mm`` and ``mm`` come back as a transposed view of a [out, T] tensor (no
copy); a layer chain that keeps activations feature-major would never need the transpose.

P4 rules: threads stated; >= 2 warm-ups and >= 10 measured runs; dense and every CSR path
alternate inside one loop (order rotated each round); median, p95 and p99 per call; speedup =
dense_time / sparse_time (> 1 means sparse is faster). Each measurement times ``inner`` back-to-
back calls (chosen so a measurement lasts about --min-ms) and divides, so 1-token rows are not
timer noise. Numerical agreement: max |sparse - dense| per row.

GPU section: when CUDA is available, 2:4 semi-structured sparsity
(``torch.sparse.to_sparse_semi_structured``, fp16) against dense fp16 on the same shapes with
512 and 4096 tokens, timed with CUDA events after synchronize. Otherwise the JSON records
``"gpu": "not measured: no GPU on this machine"``.

    python benchmarks/sparse_matmul.py [--runs N] [--warmups N] [--threads N] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

# (name, out_features, in_features) of the P4 timing model's Linear layers.
SHAPES = [
    ("q/k/v/o_proj", 768, 768),
    ("gate/up_proj", 2048, 768),
    ("down_proj", 768, 2048),
]
SPARSITIES = [0.5, 0.7, 0.9]
CPU_TOKENS = [1, 512]
GPU_TOKENS = [512, 4096]
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "sparse_matmul.json"


# ---------------------------------------------------------------------------------------------
# statistics and environment


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]), as numpy's default."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(times_s: list[float]) -> dict:
    return {
        "median_ms": statistics.median(times_s) * 1e3,
        "p95_ms": percentile(times_s, 95) * 1e3,
        "p99_ms": percentile(times_s, 99) * 1e3,
        "min_ms": min(times_s) * 1e3,
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
    except OSError:
        pass
    return []


# ---------------------------------------------------------------------------------------------
# weights


def random_sparse_weight(out_f: int, in_f: int, sparsity: float, gen: torch.Generator,
                         dtype=torch.float32) -> torch.Tensor:
    """A random weight with exactly round(sparsity * numel) zeros at random positions."""
    w = torch.randn(out_f, in_f, generator=gen, dtype=torch.float32) / math.sqrt(in_f)
    k = round(sparsity * w.numel())
    idx = torch.randperm(w.numel(), generator=gen)[:k]
    w.view(-1)[idx] = 0.0
    return w.to(dtype)


def two_four_weight(out_f: int, in_f: int, gen: torch.Generator) -> torch.Tensor:
    """A random weight pruned 2:4 along the input dimension (keep the 2 largest |w| of each 4)."""
    w = torch.randn(out_f, in_f, generator=gen) / math.sqrt(in_f)
    groups = w.view(out_f, in_f // 4, 4)
    drop = groups.abs().topk(2, dim=-1, largest=False).indices
    groups.scatter_(-1, drop, 0.0)
    return w


def csr_bytes(w: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in (w.crow_indices(), w.col_indices(), w.values()))


# ---------------------------------------------------------------------------------------------
# timing


def calibrate_inner(fn: Callable[[], object], min_s: float) -> int:
    """How many back-to-back calls make one measurement last about min_s."""
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    return max(1, min(10_000, math.ceil(min_s / one)))


def time_alternating(fns: dict[str, Callable[[], object]], runs: int, warmups: int,
                     min_s: float) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Per-call seconds for each fn, measured in one loop that alternates between them."""
    names = list(fns)
    for _ in range(warmups):
        for name in names:
            fns[name]()
    inner = {name: calibrate_inner(fns[name], min_s) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(runs):
        k = r % len(names)
        for name in names[k:] + names[:k]:  # rotate the order each round
            fn, n = fns[name], inner[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            times[name].append((time.perf_counter() - t0) / n)
    return times, inner


# ---------------------------------------------------------------------------------------------
# CPU section

CSR_PATHS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "sparse.mm": lambda w_csr, x: torch.sparse.mm(w_csr, x.t()).t(),
    "mm": lambda w_csr, x: torch.mm(w_csr, x.t()).t(),
    "linear": lambda w_csr, x: F.linear(x, w_csr),
}


def cpu_section(runs: int, warmups: int, min_s: float, paths: list[str]) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape_name, out_f, in_f in SHAPES:
        for sparsity in SPARSITIES:
            w = random_sparse_weight(out_f, in_f, sparsity, gen)
            w_csr = w.to_sparse_csr()
            for tokens in CPU_TOKENS:
                x = torch.randn(tokens, in_f, generator=gen)
                # no_grad, not inference_mode: F.linear with a CSR weight fails on inference
                # tensors ("Cannot set version_counter for inference tensor").
                with torch.no_grad():
                    ref = F.linear(x, w)
                    fns = {"dense": lambda x=x, w=w: F.linear(x, w)}
                    agreement = {}
                    errors = {}
                    for p in paths:
                        fn = (lambda x=x, p=p: CSR_PATHS[p](w_csr, x))
                        try:
                            y = fn()
                        except Exception as e:  # a path this build lacks: say so, skip it
                            errors[p] = f"{type(e).__name__}: {e}"[:200]
                            continue
                        agreement[p] = float((y - ref).abs().max())
                        fns[p] = fn
                    times, inner = time_alternating(fns, runs, warmups, min_s)
                dense = summary(times["dense"])
                sparse = {p: summary(times[p]) for p in fns if p != "dense"}
                speedup = {p: dense["median_ms"] / s["median_ms"] for p, s in sparse.items()}
                best = max(speedup, key=speedup.get) if speedup else None
                rows.append({
                    "layer": shape_name,
                    "weight_shape": [out_f, in_f],
                    "tokens": tokens,
                    "sparsity": sparsity,
                    "achieved_sparsity": float((w == 0).sum()) / w.numel(),
                    "dense": dense,
                    "csr": sparse,
                    "speedup": speedup,  # dense median / sparse median
                    "speedup_p95": {p: dense["p95_ms"] / s["p95_ms"] for p, s in sparse.items()},
                    "best_path": best,
                    "best_speedup": speedup.get(best) if best else None,
                    "max_abs_diff": agreement,
                    "ref_max_abs": float(ref.abs().max()),
                    "agrees": all(d <= 1e-4 * max(1.0, float(ref.abs().max())) for d in agreement.values()),
                    "inner_calls": inner,
                    "dense_weight_bytes": w.numel() * w.element_size(),
                    "csr_weight_bytes": csr_bytes(w_csr),
                    **({"errors": errors} if errors else {}),
                })
                print_cpu_row(rows[-1], paths)
    return rows


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def overall(rows: list[dict], paths: list[str]) -> dict:
    """Fastest CSR path overall (geometric-mean speedup over all rows) and per token count."""
    out: dict = {"geomean_speedup": {}, "by_tokens": {}}
    for p in paths:
        vals = [r["speedup"][p] for r in rows if p in r["speedup"]]
        if vals:
            out["geomean_speedup"][p] = geomean(vals)
    if out["geomean_speedup"]:
        out["fastest_path"] = max(out["geomean_speedup"], key=out["geomean_speedup"].get)
    for tokens in CPU_TOKENS:
        sub = [r for r in rows if r["tokens"] == tokens]
        by: dict = {}
        for p in paths:
            vals = [r["speedup"][p] for r in sub if p in r["speedup"]]
            if vals:
                by[p] = geomean(vals)
        out["by_tokens"][str(tokens)] = {
            "geomean_speedup": by,
            "fastest_path": max(by, key=by.get) if by else None,
            "rows_where_best_csr_beats_dense": sum(
                1 for r in sub if r["best_speedup"] is not None and r["best_speedup"] > 1.0),
            "rows": len(sub),
        }
    out["rows_where_best_csr_beats_dense"] = sum(
        1 for r in rows if r["best_speedup"] is not None and r["best_speedup"] > 1.0)
    out["rows"] = len(rows)
    return out


# ---------------------------------------------------------------------------------------------
# GPU section (2:4 semi-structured, fp16)


def gpu_section(runs: int, warmups: int, min_s: float) -> dict | str:
    if not torch.cuda.is_available():
        return "not measured: no GPU on this machine"
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    rows = []
    backend_note = None

    def convert(w16: torch.Tensor):
        nonlocal backend_note
        try:
            return to_sparse_semi_structured(w16)
        except Exception as e:  # cuSPARSELt missing or refusing: fall back to CUTLASS
            backend_note = f"default backend failed ({type(e).__name__}: {e}); forced CUTLASS"
            SparseSemiStructuredTensor._FORCE_CUTLASS = True
            return to_sparse_semi_structured(w16)

    def cuda_times(fns: dict[str, Callable[[], object]]) -> tuple[dict[str, list[float]], dict]:
        names = list(fns)
        for _ in range(warmups):
            for n in names:
                fns[n]()
        torch.cuda.synchronize()
        inner = {}
        for n in names:  # size inner from one synchronized call
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fns[n]()
            end.record()
            torch.cuda.synchronize()
            inner[n] = max(1, min(10_000, math.ceil(min_s * 1e3 / max(start.elapsed_time(end), 1e-4))))
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(runs):
            k = r % len(names)
            for n in names[k:] + names[:k]:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                for _ in range(inner[n]):
                    fns[n]()
                end.record()
                torch.cuda.synchronize()
                times[n].append(start.elapsed_time(end) / 1e3 / inner[n])
        return times, inner

    for shape_name, out_f, in_f in SHAPES:
        w = two_four_weight(out_f, in_f, gen).to(dev, torch.float16).contiguous()
        row_base = {"layer": shape_name, "weight_shape": [out_f, in_f], "pattern": "2:4"}
        try:
            w_sp = convert(w)
        except Exception as e:
            rows.append({**row_base, "error": f"{type(e).__name__}: {e}"[:300]})
            print(f"{shape_name:<13} to_sparse_semi_structured failed: {rows[-1]['error']}", flush=True)
            continue
        for tokens in GPU_TOKENS:
            x = torch.randn(tokens, in_f, generator=gen).to(dev, torch.float16)
            try:
                with torch.no_grad():  # not inference_mode: sparse weights can refuse it
                    ref = F.linear(x, w)
                    y = F.linear(x, w_sp)
                    diff = float((y.float() - ref.float()).abs().max())
                    fns = {"dense": lambda x=x: F.linear(x, w), "2:4": lambda x=x: F.linear(x, w_sp)}
                    times, inner = cuda_times(fns)
            except Exception as e:
                rows.append({**row_base, "tokens": tokens, "error": f"{type(e).__name__}: {e}"[:300]})
                print(f"{shape_name:<13} T={tokens}: failed: {rows[-1]['error']}", flush=True)
                continue
            dense, sparse = summary(times["dense"]), summary(times["2:4"])
            rows.append({
                **row_base,
                "tokens": tokens,
                "backend": type(w_sp).__name__,
                "dense": dense,
                "semi_structured": sparse,
                "speedup": dense["median_ms"] / sparse["median_ms"],
                "speedup_p95": dense["p95_ms"] / sparse["p95_ms"],
                "max_abs_diff": diff,
                "ref_max_abs": float(ref.abs().max()),
                "inner_calls": inner,
            })
            print_gpu_row(rows[-1])
    return {
        "device": torch.cuda.get_device_name(0),
        "capability": list(torch.cuda.get_device_capability(0)),
        "cuda": torch.version.cuda,
        "cusparselt_available": bool(getattr(torch.backends, "cusparselt", None)
                                     and torch.backends.cusparselt.is_available()),
        "dtype": "float16",
        "timer": "torch.cuda.Event, synchronize before and after each measurement",
        "backend_note": backend_note,
        "rows": rows,
    }


# ---------------------------------------------------------------------------------------------
# output


def print_cpu_header(paths: list[str]) -> None:
    cols = "".join(f"{p + ' ms':>13}{'x':>7}" for p in paths)
    print(f"{'layer':<13}{'W':>10}{'T':>5}{'sp':>5}{'dense ms':>10}{'p95':>8}{cols}"
          f"{'best':>11}{'best p95':>10}{'max|diff|':>11}")


def print_cpu_row(r: dict, paths: list[str]) -> None:
    shape = f"{r['weight_shape'][0]}x{r['weight_shape'][1]}"
    cols = ""
    for p in paths:
        if p in r["csr"]:
            cols += f"{r['csr'][p]['median_ms']:>13.4f}{r['speedup'][p]:>7.2f}"
        else:
            cols += f"{'n/a':>13}{'':>7}"
    diff = max(r["max_abs_diff"].values()) if r["max_abs_diff"] else float("nan")
    best_p95 = r["csr"][r["best_path"]]["p95_ms"] if r["best_path"] else float("nan")
    print(f"{r['layer']:<13}{shape:>10}{r['tokens']:>5}{r['sparsity']:>5.0%}"
          f"{r['dense']['median_ms']:>10.4f}{r['dense']['p95_ms']:>8.3f}{cols}"
          f"{str(r['best_path']):>11}{best_p95:>10.3f}{diff:>11.2e}", flush=True)


def print_gpu_row(r: dict) -> None:
    shape = f"{r['weight_shape'][0]}x{r['weight_shape'][1]}"
    print(f"{r['layer']:<13}{shape:>10}{r['tokens']:>6}  dense {r['dense']['median_ms']:.4f} ms"
          f" (p95 {r['dense']['p95_ms']:.4f})  2:4 {r['semi_structured']['median_ms']:.4f} ms"
          f" (p95 {r['semi_structured']['p95_ms']:.4f})  x{r['speedup']:.2f}"
          f"  max|diff| {r['max_abs_diff']:.2e}  [{r['backend']}]", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=20, help="measured runs per variant (>= 10)")
    ap.add_argument("--warmups", type=int, default=3, help="warm-up runs per variant (>= 2)")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch.set_num_threads (default 2, the P4 setting; 0 keeps torch's default)")
    ap.add_argument("--min-ms", type=float, default=2.0,
                    help="each measurement repeats the call until it lasts about this long")
    ap.add_argument("--paths", default=",".join(CSR_PATHS),
                    help=f"CSR paths to time, comma-separated (default: {','.join(CSR_PATHS)})")
    ap.add_argument("--no-gpu", action="store_true", help="skip the GPU section")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    if args.runs < 10 or args.warmups < 2:
        ap.error("P4 needs --runs >= 10 and --warmups >= 2")
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = [p for p in paths if p not in CSR_PATHS]
    if unknown:
        ap.error(f"unknown CSR path(s) {unknown}; valid: {', '.join(CSR_PATHS)}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    import warnings

    warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")

    settings = {
        "threads": torch.get_num_threads(),
        "dtype_cpu": "float32",
        "device": "cpu",
        "torch": torch.__version__,
        "mkl": torch.backends.mkl.is_available(),
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "python": platform.python_version(),
        "runs": args.runs,
        "warmups": args.warmups,
        "min_measurement_ms": args.min_ms,
        "batch": 1,
        "tokens_cpu": CPU_TOKENS,
        "tokens_gpu": GPU_TOKENS,
        "sparsities": SPARSITIES,
        "shapes": {name: [o, i] for name, o, i in SHAPES},
        "csr_paths": {p: {"sparse.mm": "torch.sparse.mm(W_csr, x.T).T",
                          "mm": "torch.mm(W_csr, x.T).T",
                          "linear": "F.linear(x, W_csr)"}[p] for p in paths},
        "dense_path": "F.linear(x, W) with the same pruned weight stored densely",
        "speedup": "dense median / sparse median (> 1: sparse faster)",
        "order": "dense and CSR paths alternate in one loop, order rotated every round",
        "seed": 0,
    }
    print(f"sparse_matmul: torch {settings['torch']}, threads {settings['threads']}, fp32 CPU "
          f"({settings['cpu_model']}), {args.runs} runs after {args.warmups} warm-ups; "
          f"times are per call (median), x = dense/sparse speedup", flush=True)
    print_cpu_header(paths)
    t0 = time.perf_counter()
    rows = cpu_section(args.runs, args.warmups, args.min_ms / 1e3, paths)
    summary_cpu = overall(rows, paths)
    print()
    for tokens, d in summary_cpu["by_tokens"].items():
        gm = ", ".join(f"{p} x{v:.3f}" for p, v in d["geomean_speedup"].items())
        print(f"tokens={tokens}: geomean speedup {gm}; fastest CSR path: {d['fastest_path']}; "
              f"best CSR beats dense in {d['rows_where_best_csr_beats_dense']}/{d['rows']} rows")
    print(f"overall fastest CSR path: {summary_cpu.get('fastest_path')}")

    gpu: dict | str
    if args.no_gpu:
        gpu = "not measured: --no-gpu"
    else:
        if torch.cuda.is_available():
            print("\nGPU: 2:4 semi-structured vs dense, fp16")
        gpu = gpu_section(args.runs, args.warmups, args.min_ms / 1e3)
    if isinstance(gpu, str):
        print(f"\ngpu: {gpu}")

    result = {
        "benchmark": "sparse_matmul",
        "question": "does unstructured sparsity make a matmul faster on this CPU?",
        "settings": settings,
        "cpu": {"rows": rows, "summary": summary_cpu},
        "gpu": gpu,
        "wall_s": time.perf_counter() - t0,
        "argv": sys.argv[1:],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

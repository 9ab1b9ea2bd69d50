"""What each operation runs on this machine, and how fast beside float32: ``secateur info --machine``.

For every operation of :data:`secateur.runtime.dispatch.OPS` and a few token counts, the dispatcher
chooses a kernel for a representative shape (measuring it now unless this machine's cache already
holds it) and the survey reports the choice, every candidate's median time, and the chosen
kernel's throughput and speed-up against the float32 candidate. A quantized kernel slower than
float32, or a candidate screened out after one row, is visible at a glance: the first thing to
run when a variant is slower than it should be.
"""

from __future__ import annotations

from typing import Any, Optional

from . import dispatch, kernels, machine, native

SHAPE = (768, 2048)  # (in, out) of the timing model's MLP up-projection
TOKENS = (1, 128)  # one decode step, a prefill
ATTENTION = (12, 12, 64, 512)  # heads, KV heads, head_dim, cache positions


def _row(op: str, shape: tuple[int, ...], tokens: int, record: dict[str, Any], kernel: str,
         flops: Optional[float]) -> dict[str, Any]:
    us = record.get("us", {})
    reference = us.get(dispatch.REFERENCE)
    chosen = us.get(kernel)
    return {"op": op, "shape": list(shape), "tokens": tokens, "kernel": kernel, "us": chosen,
            "fp32_us": reference, "vs_fp32": (reference / chosen) if reference and chosen else None,
            "gops": (flops / chosen / 1e3) if flops and chosen else None,
            "candidates": us, "screened": record.get("screened", [])}


def survey(shape: tuple[int, int] = SHAPE, tokens: tuple[int, ...] = TOKENS) -> dict[str, Any]:
    """The machine, the native kernels' state, and one row per (operation, token count)."""
    k, n = shape
    rows = []
    for op in ("w8a8", "w4a16", "w8a16"):
        group = 128 if op == "w4a16" and k % 128 == 0 else None
        key = (k, n, group) if group else (k, n)
        make = kernels.bench(op, k, n, group)
        for t in tokens:
            kernel = dispatch.choose(op, t, key, make)
            record = dispatch.record_of(op, t, key)
            rows.append(_row(op, key, t, record, kernel, 2.0 * dispatch.bucket(t) * k * n))
    for t in tokens:
        if t > 1:
            kernel = dispatch.choose("w8a8_gemm", t, (k, n), kernels.bench("w8a8_gemm", k, n))
            record = dispatch.record_of("w8a8_gemm", t, (k, n))
            rows.append(_row("w8a8_gemm", (k, n), t, record, kernel, 2.0 * dispatch.bucket(t) * k * n))
    if native.available():
        from .decode_attention import _bench

        kernel = dispatch.choose("decode_attention", 1, ATTENTION, _bench(*ATTENTION))
        record = dispatch.record_of("decode_attention", 1, ATTENTION)
        row = _row("decode_attention", ATTENTION, 1, record, kernel, None)
        sdpa = record.get("us", {}).get("sdpa")
        row["vs_fp32"] = sdpa / row["us"] if sdpa and row["us"] else None  # against torch's sdpa
        rows.append(row)
    return {"machine": machine.describe(), "native_kernels": native.available(),
            "cache": str(dispatch.cache_path()), "forced": dispatch.parse_forced_env(), "rows": rows}


__all__ = ["survey", "SHAPE", "TOKENS"]

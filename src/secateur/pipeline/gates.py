"""Gates: what a variant must show to be admitted, measured, with the evidence kept.

Each gate gives a verdict ``{"gate", "kind", "passed", "value", "limit", "reference", "evidence"}``:
quality against the base's or the parent's evaluation by the same task and data; speed as a
ratio measured in one process, the variant and its reference alternating round by round (the
machine's noise hits both); bytes from the artifact's card; peak RSS from a fresh process that
loads the variant and runs the P4 speed protocol (a process's peak memory cannot be told apart
from what ran before it in the same process).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from typing import Any, Optional, Sequence

from ..errors import SecateurError
from .spec import Gate

SPEED_OPTIONS = {"prompt_len": 128, "new_tokens": 32, "runs": 10}
SPEED_ROUNDS = 3
METRIC = {"decode": "decode_tokens_per_s", "prefill": "prefill_ms_median", "latency": "latency_ms_median"}
HIGHER_IS_BETTER = {"perplexity": False, "sts": True}


def measure_speed(models: Sequence[Any], rounds: int = SPEED_ROUNDS, options: Optional[dict[str, Any]] = None,
                  compile: bool = False) -> list[dict[str, Any]]:
    """P4 speed of several models, alternating between them round by round; the medians over rounds
    of each timing in ``extra``, plus the settings of the last round (kernels, runtime, threads)."""
    from ..evaluate import evaluate

    options = {**SPEED_OPTIONS, **(options or {})}
    if compile:
        options["compile"] = True
    runs: list[list[Any]] = [[] for _ in models]
    for _ in range(rounds):
        for i, model in enumerate(models):
            runs[i].append(evaluate(model, None, "speed", **options))
    out = []
    for results in runs:
        extras = [r.extra for r in results]
        keys = [k for k, v in extras[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        summary = {k: statistics.median(e[k] for e in extras if isinstance(e.get(k), (int, float))) for k in keys}
        summary["peak_rss_mib"] = max(e.get("peak_rss_mib", 0) for e in extras)
        summary["rounds"] = [{k: e.get(k) for k in METRIC.values() if k in e} for e in extras]
        summary["settings"] = {k: results[-1].settings.get(k) for k in ("threads", "runtime", "kernels", "machine",
                                                                           "protocol", "prompt_len", "new_tokens")}
        out.append(summary)
    return out


def quality_verdict(gate: Gate, value: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """``value`` and ``reference`` are evaluation dicts (EvalResult.to_dict()) of the same task and data."""
    v, r = float(value["value"]), float(reference["value"])
    higher = HIGHER_IS_BETTER.get(gate.quality, True)
    drop = (r - v) if higher else (v - r)              # how much worse, in the metric's units
    if gate.max_drop_pct is not None:
        measured, limit, unit = 100.0 * drop / abs(r) if r else float("inf"), gate.max_drop_pct, "%"
    else:
        measured, limit, unit = drop, gate.max_drop, ""
    return {"gate": gate.describe(), "kind": "quality", "passed": measured <= limit + 1e-12,
            "value": round(measured, 6), "limit": limit, "unit": unit,
            "reference": {"against": gate.against, "value": r}, "variant_value": v,
            "evidence": {"metric": value.get("metric"), "protocol": value.get("protocol"),
                         "data": (value.get("settings") or {}).get("data")}}


def speed_verdict(gate: Gate, variant: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    key = METRIC[gate.speed]
    if key not in variant or key not in reference:
        raise SecateurError(f"gate '{gate.describe()}': this model has no {gate.speed} timing "
                            f"({'an encoder has latency only' if gate.speed != 'latency' else 'a causal LM reports prefill'})")
    v, r = float(variant[key]), float(reference[key])
    speedup = v / r if key.endswith("per_s") else r / v     # throughput up, or time down
    return {"gate": gate.describe(), "kind": "speed", "passed": speedup >= gate.min_speedup,
            "value": round(speedup, 4), "limit": gate.min_speedup, "unit": "x",
            "reference": {"against": gate.against, key: r}, "variant_value": v,
            "evidence": {"metric": key, "variant_rounds": variant.get("rounds"), "reference_rounds": reference.get("rounds"),
                         "settings": variant.get("settings"), "runtime": gate.runtime}}


def bytes_verdict(gate: Gate, card: dict[str, Any]) -> dict[str, Any]:
    weights = sum(int(e.get("bytes", 0)) for n, e in (card.get("files") or {}).items() if n.endswith(".safetensors"))
    return {"gate": gate.describe(), "kind": "max_bytes", "passed": weights <= gate.max_bytes, "value": weights,
            "limit": gate.max_bytes, "unit": "bytes", "evidence": {"files": sorted(card.get("files") or {})}}


def peak_rss(artifact: str | os.PathLike, runtime: str = "eager") -> dict[str, Any]:
    """Load ``artifact`` in a fresh Python process and run the P4 speed protocol there; its peak RSS."""
    code = ("import json, sys, secateur\n"
            "from secateur.evaluate import evaluate\n"
            "from secateur.evaluate.speed import peak_rss_mib\n"
            "from secateur.runtime import optimize_\n"
            "loaded = secateur.load(sys.argv[1])\n"
            "if sys.argv[2] == 'fused':\n    optimize_(loaded.model)\n"
            f"r = evaluate(loaded.model, None, 'speed', **{SPEED_OPTIONS!r})\n"
            "print(json.dumps({'peak_rss_mib': peak_rss_mib(), 'threads': r.settings.get('threads')}))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(artifact), runtime], capture_output=True, text=True,
                          env={**os.environ, "SECATEUR_PROGRESS": "0"})
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SecateurError(f"measuring the peak memory of '{artifact}' failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rss_verdict(gate: Gate, measured: dict[str, Any]) -> dict[str, Any]:
    rss = int(measured["peak_rss_mib"] * 2**20)
    return {"gate": gate.describe(), "kind": "max_peak_rss", "passed": rss <= gate.max_peak_rss, "value": rss,
            "limit": gate.max_peak_rss, "unit": "bytes",
            "evidence": {"process": "fresh Python process: secateur.load + P4 speed", **measured}}


def failure_line(name: str, verdict: dict[str, Any]) -> str:
    """One line saying which gate a variant failed, and by how much."""
    unit = verdict.get("unit", "")
    value, limit = verdict["value"], verdict["limit"]
    if verdict["kind"] == "speed":
        by = f"{value:.3g}x, needs >= {limit:.3g}x"
    elif verdict["kind"] in ("max_bytes", "max_peak_rss"):
        by = f"{value:,} bytes, {value - limit:,} over the limit of {limit:,}"
    else:
        by = f"{value:+.4g}{unit} worse, limit {limit:.4g}{unit}"
    return f"variant '{name}' failed gate '{verdict['gate']}': {by}"


__all__ = ["measure_speed", "quality_verdict", "speed_verdict", "bytes_verdict", "peak_rss", "rss_verdict",
           "failure_line", "SPEED_OPTIONS", "METRIC"]

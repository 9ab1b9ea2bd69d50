"""One trial: build a candidate through a pipeline (its stages cached and shared with the other
candidates in the same work folder), measure its quality by the protocol and its speed against the
dense model in one alternating run, and return plain data. Module-level and JSON in, JSON out, so a
process pool or a Ray task can run it (:mod:`secateur.distributed`)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from .space import AXES, Candidate, SearchSpace


def stage_name(candidate: Candidate, upto: int) -> str:
    """A stage named by the content of the chain up to it, so two candidates that share a prefix
    share the stage (the pipeline's cache is keyed by name and content)."""
    from .space import _digest

    chain = candidate.prefixes()[: upto + 1]
    return "s-" + _digest([[axis, choice] for axis, choice in chain])[:12]


def pipeline_dict(space: SearchSpace, base: str, candidate: Candidate) -> tuple[dict[str, Any], str]:
    """The pipeline that builds ``candidate`` (one variant per applied axis) and its last variant's name."""
    variants: dict[str, Any] = {}
    parent = "base"
    for i, (axis, choice) in enumerate(candidate.prefixes()):
        name = stage_name(candidate, i)
        variants[name] = {"parent": parent, "steps": space.steps_for(axis, choice, base)}
        parent = name
    return ({"name": space.name, "family": space.name, "base": base, "data": space.data, "eval": [space.eval],
             "speed": False, "variants": variants}, parent)


def speed_options(space: SearchSpace) -> dict[str, Any]:
    s = space.speed
    options = {k: s[k] for k in ("batch", "prompt_len", "new_tokens", "runs") if s.get(k) is not None}
    return options


def speed_value(space: SearchSpace, timed: dict[str, Any]) -> float:
    """Seconds per unit of work: per decoded token, per prefill, per encoder batch."""
    metric = space.speed["metric"]
    if metric == "decode":
        return 1.0 / float(timed["decode_tokens_per_s"])
    return float(timed["prefill_ms_median" if metric == "prefill" else "latency_ms_median"]) / 1000.0


def ratio_stats(variant_rounds: list[dict[str, Any]], dense_rounds: list[dict[str, Any]], space: SearchSpace
                ) -> tuple[float, float]:
    """The variant's latency as a fraction of the dense model's: the median of the per-round ratios
    (each round times both back to back, so a drift of the machine between rounds cancels), and its
    standard error from the rounds' spread (1.4826 MAD / sqrt(n): robust to one disturbed round)."""
    import statistics

    ratios = [speed_value(space, v) / speed_value(space, d) for v, d in zip(variant_rounds, dense_rounds)]
    median = statistics.median(ratios)
    mad = statistics.median(abs(r - median) for r in ratios)
    return median, 1.4826 * mad / max(len(ratios), 1) ** 0.5


def measure_pair(space: SearchSpace, base: str, variant: str, rounds: int = 3) -> tuple[dict[str, Any], dict[str, Any]]:
    """The dense model and the variant timed together (alternating, P4) in their fastest eager form."""
    from ..artifacts import load
    from ..pipeline.gates import measure_speed
    from ..runtime import optimize_

    models = [optimize_(load(base).model), optimize_(load(variant).model)]
    timed = measure_speed(models, rounds=rounds, options=speed_options(space))
    return timed[0], timed[1]


def run_trial(item: dict[str, Any]) -> dict[str, Any]:
    """Build, evaluate and time one candidate; see the module docstring."""
    import torch

    from ..artifacts import verify
    from ..pipeline import Pipeline, run_pipeline
    from ..pipeline.run import _locked

    start = time.perf_counter()
    threads = item.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    space = SearchSpace.from_dict(item["space"], item["kind"])
    candidate = Candidate(**item["choices"])
    spec, last = pipeline_dict(space, item["base"], candidate)
    result = run_pipeline(Pipeline.from_dict(spec), item["workdir"], keep_going=False, check_plan=item.get("plan", True))
    stage = result.stages[last]
    if stage.artifact is None:
        raise RuntimeError(stage.error or f"stage {last} was not built")
    base_eval, variant_eval = result.base_evaluations[0], stage.evaluations[0]
    with _locked(Path(item["workdir"]) / space.name / "timing.lock"):  # timings never overlap
        base_t, variant_t = measure_pair(space, item["base_path"], stage.artifact)
    card = verify(stage.artifact)
    variant_bytes = sum(e["bytes"] for n, e in card["files"].items() if n.endswith(".safetensors"))
    base_bytes = item["base_bytes"]
    higher = space.eval["task"] == "sts"
    quality, reference = float(variant_eval["value"]), float(base_eval["value"])
    drop = (reference - quality) if higher else (quality - reference)
    latency, latency_se = ratio_stats(variant_t["rounds"], base_t["rounds"], space)
    return {"candidate": candidate.id, "label": candidate.label(), "artifact": stage.artifact,
            "weights_sha256": stage.weights_sha256,
            "stages": [{"name": n, "artifact": result.stages[n].artifact, "parent": result.stages[n].parent,
                        "cached": result.stages[n].cached, "seconds": result.stages[n].seconds}
                       for n in Pipeline.from_dict(spec).order()],
            "quality": quality, "quality_reference": reference, "metric": variant_eval.get("metric"),
            "protocol": variant_eval.get("protocol"), "evaluation": variant_eval,
            "quality_drop": drop, "quality_drop_pct": 100.0 * drop / abs(reference) if reference else 0.0,
            "latency": latency, "latency_se": latency_se, "speedup": 1.0 / latency, "bytes": variant_bytes / base_bytes,
            "variant_bytes": variant_bytes, "speed": variant_t, "base_speed": base_t,
            "seconds": round(time.perf_counter() - start, 3), "pid": os.getpid()}


__all__ = ["run_trial", "pipeline_dict", "stage_name", "measure_pair", "ratio_stats", "speed_value", "AXES"]

"""Offline routing: calibrating a confidence cascade's thresholds on calibration-split prompts, and
measuring its cost-quality curve on evaluation-split prompts (:func:`route_eval`).

A cascade (:class:`~secateur.serve.policy.CascadePolicy`) lets the cheapest tier answer and
escalates when the answer's *confidence* — a quantile of its generated tokens' log-probabilities
(:func:`~secateur.serve.policy.confidence`) — is under a threshold. The threshold is fitted offline
so that a chosen share of requests escalates:

1. prompts are the first ``prompt_tokens`` tokens of TinyStories paragraphs of the
   **calibration** split (protocol P1: the first 430 paragraphs; never the evaluation split);
2. each tier but the last answers every prompt greedily (``max_tokens`` tokens, the runtime's
   batched decoding, as the gateway runs it) and each answer's confidence is kept;
3. :func:`threshold_for_rate` puts the threshold between the k-th and (k+1)-th smallest
   confidence, k = round(rate x prompts), so exactly k calibration prompts fall under it.

Each escalating tier gets its own threshold, fitted on all calibration prompts to the same target
rate (the share of the requests reaching that tier that go on up). ``secateur route-calibrate``
writes the result as JSON, which serve.yaml's ``policy: {kind: cascade, calibration: FILE}`` reads.
The fitted threshold holds for answers like the calibration ones: greedy, ``max_tokens`` long.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import SecateurError
from .config import ServeConfig
from .policy import confidence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoryPrompt:
    """The first tokens of a paragraph (``prompt``) and the tokens that truly follow (``continuation``)."""

    prompt: list[int]
    continuation: list[int]


def story_prompts(tokenizer: Any, split: str = "calibration", n: int = 200, prompt_tokens: int = 16,
                  continuation_tokens: int = 32, dataset: str = "tinystories") -> list[StoryPrompt]:
    """``n`` prompts from the paragraphs of ``split`` (in order), each paragraph's first
    ``prompt_tokens`` tokens (BOS included, as P1 tokenizes) and the ``continuation_tokens`` after
    them; paragraphs too short for both are skipped."""
    from ..data import source

    if prompt_tokens < 2 or continuation_tokens < 1 or n < 1:
        raise SecateurError(f"need n >= 1, prompt_tokens >= 2 and continuation_tokens >= 1; got {n}, {prompt_tokens}, "
                            f"{continuation_tokens}")
    out: list[StoryPrompt] = []
    for text in source(dataset).texts(split):
        ids = list(tokenizer(text)["input_ids"])
        if len(ids) >= prompt_tokens + continuation_tokens:
            out.append(StoryPrompt(ids[:prompt_tokens], ids[prompt_tokens:prompt_tokens + continuation_tokens]))
            if len(out) == n:
                break
    if len(out) < n:
        log.warning("only %d paragraphs of %s/%s are long enough (asked for %d)", len(out), dataset, split, n)
    if not out:
        raise SecateurError(f"no paragraph of {dataset}/{split} has {prompt_tokens + continuation_tokens} tokens")
    return out


def greedy_answers(model: Any, tokenizer: Any, prompts: list[list[int]], max_tokens: int,
                   batch: int = 32) -> list[tuple[list[int], list[float], float]]:
    """Each prompt's greedy answer through the runtime's batched decoding: (tokens, their
    log-probabilities, seconds of the batch it ran in divided by the batch's rows)."""
    from ..runtime.batching import DecodeBatch, Sampling, Sequence

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = eos if eos is not None else tokenizer.eos_token_id
    eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
    out = []
    for start in range(0, len(prompts), batch):
        rows = [Sequence(list(p), max_tokens, Sampling(temperature=0.0), eos_ids) for p in prompts[start:start + batch]]
        began = time.perf_counter()
        decoder = DecodeBatch(model, pad_id=pad)
        decoder.admit(rows)
        decoder.drop()
        while len(decoder):
            decoder.step()
            decoder.drop()
        each = (time.perf_counter() - began) / len(rows)
        out += [(r.tokens, r.logprobs, each) for r in rows]
    return out


def threshold_for_rate(scores: list[float], rate: float) -> float:
    """The threshold under which ``round(rate * len(scores))`` of ``scores`` fall: halfway between the
    k-th and (k+1)-th smallest (one below the smallest for k = 0, one above the largest for all)."""
    if not scores:
        raise SecateurError("no scores to calibrate on")
    if not 0.0 <= rate <= 1.0:
        raise SecateurError(f"the target escalation rate must be in [0, 1], got {rate}")
    ordered = sorted(scores)
    k = round(rate * len(ordered))
    if k == 0:
        return ordered[0] - 1.0
    if k == len(ordered):
        return ordered[-1] + 1.0
    return (ordered[k - 1] + ordered[k]) / 2.0


def calibrate_cascade(family: str, config: Union[ServeConfig, str, Path, None] = None, *, target_rate: float = 0.3,
                      quantile: float = 0.1, prompts: int = 200, max_tokens: int = 32, prompt_tokens: int = 16,
                      home: Union[str, Path, None] = None, out: Union[str, Path, None] = None) -> dict[str, Any]:
    """Fit the cascade's thresholds for ``family`` (tiers in serve.yaml's order, or the cascade
    policy's ``order``) to ``target_rate`` on calibration-split prompts (see the module text);
    returns the calibration (and writes it as JSON to ``out``)."""
    from .family import Family, load_model

    cfg = config if isinstance(config, ServeConfig) else (ServeConfig.load(config) if config else ServeConfig())
    fam = Family(family, cfg, home)
    try:
        order = list(cfg.policy.get("order") or fam.tiers) if cfg.policy.get("kind") == "cascade" else list(fam.tiers)
        if len(order) < 2:
            raise SecateurError("a cascade needs at least two tiers, cheapest first (serve.yaml `tiers:`)")
        unknown = [t for t in order if t not in fam.tiers]
        if unknown:
            raise SecateurError(f"cascade order names unknown tiers {unknown}; tiers: {', '.join(fam.tiers)}")
        thresholds, summary = [], []
        for tier in order[:-1]:
            variant = fam.variants[fam.tiers[tier]]
            model, tokenizer, kind = load_model(variant)
            if kind != "causal":
                raise SecateurError(f"tier '{tier}' is an {kind}; the cascade routes causal LMs")
            items = story_prompts(tokenizer, "calibration", prompts, prompt_tokens)
            answers = greedy_answers(model, tokenizer, [p.prompt for p in items], max_tokens)
            scores = [confidence(lps, quantile) for _, lps, _ in answers]
            threshold = threshold_for_rate(scores, target_rate)
            thresholds.append(threshold)
            summary.append({"tier": tier, "variant": variant.id, "threshold": threshold, "prompts": len(scores),
                            "escalated": sum(s < threshold for s in scores),
                            "score_min": min(scores), "score_median": sorted(scores)[len(scores) // 2],
                            "score_max": max(scores)})
            del model
    finally:
        fam.close()
    result = {"kind": "cascade-calibration", "family": family, "order": order, "quantile": quantile,
              "thresholds": thresholds, "target_rate": target_rate, "max_tokens": max_tokens,
              "prompt_tokens": prompt_tokens, "dataset": "tinystories", "split": "calibration", "tiers": summary}
    if out is not None:
        path = Path(out).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def continuation_nll(model: Any, items: list[StoryPrompt], batch: int = 64) -> list[float]:
    """Each item's mean negative log-likelihood (nats per token) of its true continuation given its
    prompt (teacher forcing; every item has the same lengths, so no padding)."""
    import torch

    out: list[float] = []
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        ids = torch.tensor([it.prompt + it.continuation for it in chunk], dtype=torch.long)
        n = len(chunk[0].prompt)
        with torch.inference_mode():
            logits = model(input_ids=ids).logits[:, n - 1:-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, n:], reduction="none")
        out += nll.mean(dim=1).tolist()
    return out


def _area(xs: list[float], ys: list[float]) -> float:
    """Trapezoid area under (xs, ys) over [0, 1], the curve held flat outside the measured xs."""
    points = sorted(zip(xs, ys))
    points = [(0.0, points[0][1])] + points + [(1.0, points[-1][1])]
    return sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(points, points[1:]))


def route_eval(family: str, config: Union[ServeConfig, str, Path, None] = None, *, quantile: float = 0.1,
               calibration_prompts: int = 200, eval_prompts: int = 500, max_tokens: int = 32, prompt_tokens: int = 16,
               continuation_tokens: int = 32, rates: Optional[list[float]] = None, batch: int = 1,
               home: Union[str, Path, None] = None, record: bool = True) -> dict[str, Any]:
    """The cost-quality curve of the two-tier confidence cascade (serve.yaml's first and last tier)
    as its target escalation rate moves, on held-out prompts (issue 24's protocol):

    * prompts are the first ``prompt_tokens`` tokens of TinyStories paragraphs; thresholds are
      fitted on the calibration split only (:func:`threshold_for_rate`), measured on the
      evaluation split;
    * quality is the perplexity of the true next ``continuation_tokens`` tokens under the variant
      that answers (exp of the mean per-prompt NLL); the gap recovered is measured on its log, the
      mean NLL: (nll_small - nll_policy) / (nll_small - nll_large). On that scale random routing
      recovers exactly the share it escalates; on perplexity itself it would recover more (exp is
      convex: (ppl_small - exp(nll_small - share x gap)) / (ppl_small - ppl_large)), so a wide gap
      would flatter any router. Both are returned (``gap_recovered``, ``gap_recovered_ppl`` beside
      ``random_ppl``), with both areas;
    * cost is the measured time of every variant invoked: the small tier's greedy answer for every
      prompt, plus the large tier's for the escalated ones (``batch`` prompts at a time; 1 = as
      single requests);
    * random routing at the same escalation share recovers that share of the gap on average; APGR
      is the area under the gap-recovered curve over the escalation share (random: 0.5);
    * ``hindsight`` escalates the prompts in the order of their true gain (known only after the
      fact): no router does better on these prompts, so its area bounds any policy's APGR.

    The result is kept in the registry as a finished run ``route-eval:FAMILY`` unless ``record`` is
    false; ``secateur report`` draws the family's last one.
    """
    import math

    from .family import Family, load_model

    cfg = config if isinstance(config, ServeConfig) else (ServeConfig.load(config) if config else ServeConfig())
    rates = rates if rates is not None else [round(0.05 * i, 2) for i in range(21)]
    fam = Family(family, cfg, home)
    try:
        tiers = list(fam.tiers)
        if len(tiers) < 2:
            raise SecateurError("route-eval needs two tiers in serve.yaml (cheapest first, e.g. tiers: {small: w4, "
                                "large: base})")
        small_tier, large_tier = tiers[0], tiers[-1]
        measured: dict[str, Any] = {}
        for tier in (small_tier, large_tier):
            model, tokenizer, kind = load_model(fam.variants[fam.tiers[tier]])
            if kind != "causal":
                raise SecateurError(f"tier '{tier}' is an {kind}; route-eval measures causal LMs")
            held = story_prompts(tokenizer, "evaluation", eval_prompts, prompt_tokens, continuation_tokens)
            greedy_answers(model, tokenizer, [p.prompt for p in held[:batch]], 2, batch=batch)  # warm-up, not timed
            answers = greedy_answers(model, tokenizer, [p.prompt for p in held], max_tokens, batch=batch)
            measured[tier] = {"variant": fam.tiers[tier], "nll": continuation_nll(model, held),
                              "seconds": [a[2] for a in answers],
                              "scores": [confidence(a[1], quantile) for a in answers]}
            if tier == small_tier:
                calib = story_prompts(tokenizer, "calibration", calibration_prompts, prompt_tokens, continuation_tokens)
                calib_answers = greedy_answers(model, tokenizer, [p.prompt for p in calib], max_tokens, batch=32)
                measured["calibration_scores"] = [confidence(a[1], quantile) for a in calib_answers]
            del model
    finally:
        fam.close()
    small, large = measured[small_tier], measured[large_tier]
    result = _curve(small["nll"], large["nll"], small["seconds"], large["seconds"], small["scores"],
                    measured["calibration_scores"], rates)
    result = {"family": family,
              "small": {"tier": small_tier, "variant": small["variant"], "perplexity": result.pop("ppl_small"),
                        "cost_s": sum(small["seconds"])},
              "large": {"tier": large_tier, "variant": large["variant"], "perplexity": result.pop("ppl_large"),
                        "cost_s": sum(large["seconds"])},
              "policy": "cascade", "quantile": quantile,
              "prompts": {"calibration": len(measured["calibration_scores"]), "evaluation": len(small["nll"])},
              "max_tokens": max_tokens, "prompt_tokens": prompt_tokens, "continuation_tokens": continuation_tokens,
              "batch": batch, **result}
    if record:
        _record(family, result, home)
    return result


def _curve(nll_small: list[float], nll_large: list[float], sec_small: list[float], sec_large: list[float],
           scores: list[float], calibration_scores: list[float], rates: list[float]) -> dict[str, Any]:
    """The curve from per-prompt numbers (see :func:`route_eval`): each target rate's threshold from
    the calibration scores, the evaluation prompts under it escalated."""
    import math

    n = len(nll_small)
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    ms, ml = mean(nll_small), mean(nll_large)
    ppl_small, ppl_large = math.exp(ms), math.exp(ml)
    gap, ppl_gap = ms - ml, ppl_small - ppl_large
    cost_small, cost_large = sum(sec_small), sum(sec_large)

    def random_ppl_recovered(share: float) -> Optional[float]:
        # random routing at this share: the mean NLL moves linearly, so perplexity moves as exp of it
        return (ppl_small - math.exp(ms - share * gap)) / ppl_gap if ppl_gap else None

    curve = []
    for rate in rates:
        t = threshold_for_rate(calibration_scores, rate)
        up = [s < t for s in scores]
        nll = [nll_large[i] if up[i] else nll_small[i] for i in range(n)]
        cost = cost_small + sum(sec_large[i] for i in range(n) if up[i])
        share = sum(up) / n
        p = math.exp(mean(nll))
        curve.append({"target_rate": rate, "threshold": t, "escalated": share, "perplexity": p,
                      "gap_recovered": (ms - mean(nll)) / gap if gap else None,
                      "gap_recovered_ppl": (ppl_small - p) / ppl_gap if ppl_gap else None,
                      "random_ppl": random_ppl_recovered(share), "cost_s": cost,
                      "cost_vs_large": cost / cost_large if cost_large else None})
    # in hindsight: escalating the prompts in the order of their true gain, which no router can know;
    # the best any router could do on these prompts (an upper bound, not a policy)
    order = sorted(range(n), key=lambda i: nll_large[i] - nll_small[i])
    hindsight, total = [(0.0, 0.0)], sum(nll_small)
    for k, i in enumerate(order, 1):
        total += nll_large[i] - nll_small[i]
        hindsight.append((k / n, (sum(nll_small) - total) / (n * gap) if gap else 0.0))
    step = max(1, n // 50)
    valid = [c for c in curve if c["gap_recovered"] is not None]
    apgr = _area([c["escalated"] for c in valid], [c["gap_recovered"] for c in valid]) if valid else None
    apgr_ppl = _area([c["escalated"] for c in valid], [c["gap_recovered_ppl"] for c in valid]) if valid else None
    random_apgr_ppl = None
    if ppl_gap and gap:
        # the integral over the share r of (ppl_small - exp(ms - r gap)) / ppl_gap
        random_apgr_ppl = (ppl_small - (ppl_small - ppl_large) / gap) / ppl_gap
    cost80 = None
    ordered = sorted(valid, key=lambda c: c["cost_s"])
    for a, b in zip(ordered, ordered[1:]):
        if a["gap_recovered"] < 0.8 <= b["gap_recovered"]:
            f = (0.8 - a["gap_recovered"]) / (b["gap_recovered"] - a["gap_recovered"])
            cost80 = a["cost_s"] + f * (b["cost_s"] - a["cost_s"])
            break
    if cost80 is None and ordered and ordered[0]["gap_recovered"] >= 0.8:
        cost80 = ordered[0]["cost_s"]
    beats = [c for c in valid if 0.1 <= c["target_rate"] <= 0.9]
    return {"ppl_small": ppl_small, "ppl_large": ppl_large, "curve": curve,
            "apgr": apgr, "random_apgr": 0.5, "scale": "log-perplexity (mean NLL)",
            "apgr_ppl": apgr_ppl, "random_apgr_ppl": random_apgr_ppl,
            "hindsight": [list(p) for p in hindsight[::step]] + ([list(hindsight[-1])] if (len(hindsight) - 1) % step else []),
            "hindsight_apgr": _area([x for x, _ in hindsight], [y for _, y in hindsight]),
            "cost_at_80pct_s": cost80, "cost_at_80pct_vs_large": cost80 / cost_large if cost80 and cost_large else None,
            "beats_random_10_to_90": bool(beats) and all(c["gap_recovered"] > c["escalated"] for c in beats)}


def route_eval_table(result: dict[str, Any]) -> Any:
    """The curve as a rich table (the CLI and the benchmark print it)."""
    from rich.table import Table

    def f(v: Any, digits: int = 3) -> str:
        return "-" if v is None else f"{v:.{digits}f}"

    grid = Table(title=f"route-eval {result['family']}: cascade {result['small']['tier']} -> {result['large']['tier']}, "
                       f"{result['prompts']['evaluation']} held-out prompts, quantile {result['quantile']}")
    for col in ("target rate", "threshold", "escalated", "perplexity", "gap recovered", "ppl gap recovered",
                "(random)", "cost (s)", "cost / large"):
        grid.add_column(col, justify="right")
    for c in result["curve"]:
        grid.add_row(f"{c['target_rate']:.2f}", f(c["threshold"], 4), f(c["escalated"]), f(c["perplexity"], 4),
                     f(c["gap_recovered"]), f(c.get("gap_recovered_ppl")), f(c.get("random_ppl")), f(c["cost_s"]),
                     f(c["cost_vs_large"]))
    return grid


def route_eval_summary(result: dict[str, Any]) -> str:
    """One paragraph: the two tiers, APGR on both scales beside random routing and the hindsight
    bound, the cost at 80% of the gap, and the check against random routing."""
    def f(v: Any, digits: int = 3) -> str:
        return "-" if v is None else f"{v:.{digits}f}"

    s, l = result["small"], result["large"]
    return (f"small ({s['tier']}): perplexity {s['perplexity']:.4f}, {s['cost_s']:.2f} s; large ({l['tier']}): "
            f"{l['perplexity']:.4f}, {l['cost_s']:.2f} s\n"
            f"APGR {f(result['apgr'])} on log-perplexity (random routing 0.5; in hindsight at best "
            f"{f(result.get('hindsight_apgr'))}); on perplexity {f(result.get('apgr_ppl'))} (random "
            f"{f(result.get('random_apgr_ppl'))})\n"
            f"cost at 80% of the gap recovered: "
            f"{'-' if result['cost_at_80pct_vs_large'] is None else f(result['cost_at_80pct_vs_large']) + 'x the large tier'}"
            f"; above random routing at every target rate from 0.1 to 0.9: {result['beats_random_10_to_90']}")


ROUTE_EVAL_RUN = "route-eval:{family}"


def _record(family: str, result: dict[str, Any], home: Union[str, Path, None]) -> None:
    """Keep the curve in the registry as a finished run ``route-eval:FAMILY`` (the report draws the
    last one)."""
    from .family import open_registry

    registry = open_registry(home)
    try:
        run = registry.start_run(ROUTE_EVAL_RUN.format(family=family), info={"kind": "route-eval", **result})
        registry.finish_run(run)
    finally:
        registry.close()


__all__ = ["StoryPrompt", "story_prompts", "greedy_answers", "threshold_for_rate", "calibrate_cascade",
           "continuation_nll", "route_eval", "route_eval_table", "route_eval_summary", "ROUTE_EVAL_RUN"]

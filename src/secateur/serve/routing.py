"""Offline routing: calibrating a confidence cascade's thresholds on calibration-split prompts.

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


__all__ = ["StoryPrompt", "story_prompts", "greedy_answers", "threshold_for_rate", "calibrate_cascade"]

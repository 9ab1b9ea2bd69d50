"""Routing policies: which tier answers a request, and what happens after it answers or fails.

A policy is a small object with three hooks, each given the request (:class:`RouteRequest`: its
``model``, endpoint, headers, prompt and a per-request ``seed``) and the family's state
(:class:`FamilyView`: the tiers in cost order, the aliases, the default):

* :meth:`Policy.decide` — before anything runs: a :class:`Decision` (tier, variant id, a label
  that ends up in the ``x-secateur-decision`` header, the access log and the metrics);
* :meth:`Policy.on_error` — the chosen tier raised or timed out: another decision to retry with,
  or ``None`` to answer with the error (the fallback policy lives here);
* :meth:`Policy.after` — the tier answered (a non-streamed answer, with each generated token's
  log-probability in ``outcome.logprobs``): another decision to escalate to, or ``None`` to
  accept. A confidence cascade fits here: decide the cheapest tier, escalate when a quantile of
  the log-probabilities falls under a calibrated threshold. Streamed answers are sent as they are
  made, so ``after`` is not consulted for them.

Only a request naming the family itself (``model: stories``, or ``auto``) is routed by the policy;
a request naming a tier, alias or variant is pinned to it (label ``pinned``) by the gateway, and
``on_error`` is still asked. A user policy subclasses :class:`Policy` and is named in serve.yaml
as ``policy: {kind: package.module:Class, ...}``: the other keys are its constructor's keyword
arguments. Built in: ``static`` (weights), ``fallback`` (``on_error``), ``sticky`` (A/B by a hash of
a user header), ``canary`` (a percentage) and ``cascade`` (``after``: escalate when the answer's
confidence is under a calibrated threshold).

Policies are shared by all requests (called from the event loop, never concurrently with
themselves within one process); randomness comes from a seeded ``random.Random`` they own.
"""

from __future__ import annotations

import hashlib
import importlib
import random
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from ..errors import ConfigError, SecateurError, did_you_mean, one_of


@dataclass(frozen=True)
class Decision:
    """Who answers: the tier (or the alias / variant name a pinned request used), the variant id it
    resolved to, and the label that explains why (``static``, ``pinned``, ``fallback``, …)."""

    tier: str
    variant: str
    label: str
    attempt: int = 0


@dataclass
class RouteRequest:
    """What a policy may look at. ``kind`` is ``completion``, ``chat`` or ``embedding``."""

    model: str
    kind: str
    headers: Mapping[str, str] = field(default_factory=dict)
    prompt: Any = None
    stream: bool = False
    seed: Optional[int] = None
    tried: list[Decision] = field(default_factory=list)
    policy: Any = field(default=None, repr=False)  # the gateway's policy when the request started


@dataclass
class Outcome:
    """What a tier produced: its generated tokens' log-probabilities (per choice, flattened) and
    seconds; ``error`` is a short kind (``timeout``, ``error``) when it failed."""

    logprobs: list[float] = field(default_factory=list)
    seconds: float = 0.0
    error: Optional[str] = None


class FamilyView:
    """The family as a policy sees it: ``tiers`` (name → variant id, cheapest first, as serve.yaml
    lists them), ``aliases`` (name → variant id), ``default`` (a tier or alias name) and
    :meth:`decision` to make a well-formed :class:`Decision` for a tier."""

    def __init__(self, family: str, tiers: Mapping[str, str], aliases: Mapping[str, str], default: str,
                 default_variant: str):
        self.family, self.tiers, self.aliases = family, dict(tiers), dict(aliases)
        self.default, self.default_variant = default, default_variant

    def decision(self, tier: str, label: str, attempt: int = 0) -> Decision:
        if tier in self.tiers:
            return Decision(tier, self.tiers[tier], label, attempt)
        if tier in self.aliases:
            return Decision(tier, self.aliases[tier], label, attempt)
        if tier == self.default:
            return Decision(tier, self.default_variant, label, attempt)
        valid = list(self.tiers) or list(self.aliases)
        raise SecateurError(f"policy chose unknown tier '{tier}'{did_you_mean(tier, valid)}; tiers: {one_of(valid)}")


class Policy:
    """The base policy: every routed request goes to the family's default; no retries."""

    kind = "default"

    def decide(self, request: RouteRequest, family: FamilyView) -> Decision:
        return family.decision(family.default, self.kind)

    def on_error(self, request: RouteRequest, decision: Decision, outcome: Outcome,
                 family: FamilyView) -> Optional[Decision]:
        return None

    def after(self, request: RouteRequest, decision: Decision, outcome: Outcome,
              family: FamilyView) -> Optional[Decision]:
        return None

    def describe(self) -> dict[str, Any]:
        """What ``/v1/models`` and the start-up log say about this policy."""
        return {"kind": self.kind}

    def named_tiers(self) -> list[str]:
        """The tier names this policy's options mention (checked against serve.yaml's tiers)."""
        return list(getattr(self, "weights", {}) or {}) + list(getattr(self, "order", None) or [])


class StaticPolicy(Policy):
    """Weighted random choice of a tier (``weights``: tier → non-negative number), from a
    ``random.Random(seed)`` the policy owns; with no weights, the family's default."""

    kind = "static"

    def __init__(self, weights: Optional[Mapping[str, float]] = None, seed: int = 0):
        self.weights = dict(weights or {})
        for tier, weight in self.weights.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
                raise ConfigError(f"policy.weights.{tier}", f"expected a number >= 0, got {weight!r}")
        if self.weights and sum(self.weights.values()) <= 0:
            raise ConfigError("policy.weights", "at least one weight must be above 0")
        self.rng = random.Random(seed)
        self.seed = seed

    def decide(self, request: RouteRequest, family: FamilyView) -> Decision:
        if not self.weights:
            return family.decision(family.default, self.kind)
        tiers = list(self.weights)
        return family.decision(self.rng.choices(tiers, weights=[self.weights[t] for t in tiers])[0], self.kind)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "weights": self.weights, "seed": self.seed}


class FallbackPolicy(Policy):
    """``order[0]`` answers; when a tier fails or passes ``attempt_timeout_s``, the next tier in
    ``order`` retries the request (label ``fallback``), up to the end of the list. Pinned requests
    fall back along the same order from the tier after theirs. Default order: the tiers as listed."""

    kind = "fallback"

    def __init__(self, order: Optional[list[str]] = None, attempt_timeout_s: Optional[float] = None):
        if order is not None and (not isinstance(order, list) or not all(isinstance(t, str) for t in order)):
            raise ConfigError("policy.order", f"expected a list of tier names, got {order!r}")
        if attempt_timeout_s is not None and (isinstance(attempt_timeout_s, bool) or
                                              not isinstance(attempt_timeout_s, (int, float)) or attempt_timeout_s <= 0):
            raise ConfigError("policy.attempt_timeout_s", f"expected a number of seconds > 0, got {attempt_timeout_s!r}")
        self.order = order
        self.attempt_timeout_s = attempt_timeout_s

    def _order(self, family: FamilyView) -> list[str]:
        return list(self.order) if self.order else (list(family.tiers) or [family.default])

    def decide(self, request: RouteRequest, family: FamilyView) -> Decision:
        return family.decision(self._order(family)[0], self.kind)

    def on_error(self, request: RouteRequest, decision: Decision, outcome: Outcome,
                 family: FamilyView) -> Optional[Decision]:
        order = self._order(family)
        tried = {d.tier for d in request.tried} | {decision.tier}
        start = order.index(decision.tier) + 1 if decision.tier in order else 0
        for tier in order[start:]:
            if tier not in tried:
                return family.decision(tier, "fallback", decision.attempt + 1)
        return None

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "order": self.order, "attempt_timeout_s": self.attempt_timeout_s}


def _weights(path: str, weights: Any) -> dict[str, float]:
    if not isinstance(weights, Mapping) or not weights:
        raise ConfigError(path, f"expected a mapping of tier name to weight, got {weights!r}")
    out = {}
    for tier, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
            raise ConfigError(f"{path}.{tier}", f"expected a number >= 0, got {weight!r}")
        out[str(tier)] = float(weight)
    if sum(out.values()) <= 0:
        raise ConfigError(path, "at least one weight must be above 0")
    return out


def bucket(key: str, salt: str = "") -> float:
    """A number in [0, 1) that depends on ``key`` (and ``salt``) only: the same user gets the same
    number in every process and after every restart (SHA-256, not Python's salted ``hash``)."""
    digest = hashlib.sha256(f"{salt}\0{key}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def pick(weights: Mapping[str, float], u: float) -> str:
    """The tier whose share of the cumulative weights holds ``u`` in [0, 1) (tiers in their listed order)."""
    total = sum(weights.values())
    at = 0.0
    for tier, weight in weights.items():
        at += weight / total
        if u < at and weight > 0:
            return tier
    return next(t for t, w in reversed(list(weights.items())) if w > 0)  # u within rounding of 1


class StickyPolicy(Policy):
    """Sticky A/B: the tier is chosen by ``weights`` from :func:`bucket` of the request's ``header``
    (a user or session id), so one user always gets the same tier (label ``sticky``); a request
    without the header is chosen at random by the same weights (label ``sticky-random``).
    Change ``salt`` to deal the users out again."""

    kind = "sticky"

    def __init__(self, weights: Mapping[str, float], header: str = "x-user", salt: str = "", seed: int = 0):
        self.weights = _weights("policy.weights", weights)
        if not isinstance(header, str) or not header.strip():
            raise ConfigError("policy.header", f"expected a header name, got {header!r}")
        self.header, self.salt, self.seed = header.strip().lower(), str(salt), seed
        self.rng = random.Random(seed)

    def decide(self, request: RouteRequest, family: FamilyView) -> Decision:
        key = _header(request, self.header)
        if key is None:
            return family.decision(pick(self.weights, self.rng.random()), "sticky-random")
        return family.decision(pick(self.weights, bucket(key, self.salt)), self.kind)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "weights": self.weights, "header": self.header, "salt": self.salt}


class CanaryPolicy(Policy):
    """A canary: ``percent`` of routed requests go to the ``canary`` tier (label ``canary``), the rest
    to ``stable`` (default: the family's default; label ``stable``). With ``header`` the split is
    sticky per user (:func:`bucket`); without it each request is drawn from a seeded generator."""

    kind = "canary"

    def __init__(self, canary: str, percent: float = 5.0, stable: Optional[str] = None,
                 header: Optional[str] = None, salt: str = "", seed: int = 0):
        if not isinstance(canary, str) or not canary:
            raise ConfigError("policy.canary", f"expected a tier name, got {canary!r}")
        if stable is not None and (not isinstance(stable, str) or not stable):
            raise ConfigError("policy.stable", f"expected a tier name, got {stable!r}")
        if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not 0 <= percent <= 100:
            raise ConfigError("policy.percent", f"expected a number in [0, 100], got {percent!r}")
        if header is not None and (not isinstance(header, str) or not header.strip()):
            raise ConfigError("policy.header", f"expected a header name, got {header!r}")
        self.canary, self.stable, self.percent = canary, stable, float(percent)
        self.header = header.strip().lower() if header else None
        self.salt, self.seed = str(salt), seed
        self.rng = random.Random(seed)

    def decide(self, request: RouteRequest, family: FamilyView) -> Decision:
        key = _header(request, self.header) if self.header else None
        u = bucket(key, self.salt) if key is not None else self.rng.random()
        if u * 100.0 < self.percent:
            return family.decision(self.canary, "canary")
        return family.decision(self.stable or family.default, "stable")

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "canary": self.canary, "stable": self.stable, "percent": self.percent,
                "header": self.header}

    def named_tiers(self) -> list[str]:
        return [self.canary] + ([self.stable] if self.stable else [])


def confidence(logprobs: list[float], quantile: float) -> float:
    """The ``quantile`` (0-1, linear interpolation between order statistics, as numpy's default) of a
    generation's token log-probabilities: low when some of its tokens were unlikely. 0.0 (fully
    confident) for an empty generation."""
    if not logprobs:
        return 0.0
    ordered = sorted(logprobs)
    at = quantile * (len(ordered) - 1)
    low = int(at)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


class CascadePolicy(Policy):
    """Confidence cascade: the cheapest tier of ``order`` answers first (label ``cascade``); when the
    :func:`confidence` (the ``quantile`` of its tokens' log-probabilities) falls under the tier's
    threshold, the next tier answers instead (label ``escalated``), and so on up the order.

    ``threshold`` is one number for every step or a list (one per tier but the last);
    ``calibration`` names a JSON file written by ``secateur route-calibrate`` (thresholds fitted
    offline to a target escalation rate on calibration-split prompts) whose order, quantile and
    thresholds are used unless given here. Pinned requests never escalate. A streamed routed
    request cannot be taken back once sent: it goes to ``stream_tier`` (default: the first tier,
    label ``cascade-stream``). Embedding requests go to the first tier."""

    kind = "cascade"

    def __init__(self, order: Optional[list[str]] = None, threshold: Any = None, quantile: Optional[float] = None,
                 calibration: Optional[str] = None, stream_tier: Optional[str] = None):
        calibrated: dict[str, Any] = {}
        if calibration is not None:
            calibrated = read_calibration(calibration)
        order = order if order is not None else calibrated.get("order")
        if order is not None and (not isinstance(order, list) or len(order) < 2
                                  or not all(isinstance(t, str) for t in order)):
            raise ConfigError("policy.order", f"expected a list of at least two tier names, cheapest first, got {order!r}")
        quantile = quantile if quantile is not None else calibrated.get("quantile", 0.1)
        if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0 <= quantile <= 1:
            raise ConfigError("policy.quantile", f"expected a number in [0, 1], got {quantile!r}")
        threshold = threshold if threshold is not None else calibrated.get("thresholds")
        if threshold is None:
            raise ConfigError("policy.threshold", "the cascade needs a threshold (a log-probability, e.g. -3.0, or "
                                                  "a list) or a calibration file from `secateur route-calibrate`")
        values = threshold if isinstance(threshold, list) else [threshold]
        if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
            raise ConfigError("policy.threshold", f"expected a number or a list of numbers, got {threshold!r}")
        if order is not None and isinstance(threshold, list) and len(values) != len(order) - 1:
            raise ConfigError("policy.threshold", f"expected {len(order) - 1} thresholds (one per tier but the last) "
                                                  f"for order {order}, got {len(values)}")
        self.order, self.quantile, self.calibration = order, float(quantile), calibration
        self.thresholds = [float(v) for v in values]
        self.stream_tier = stream_tier

    def _order(self, family: FamilyView) -> list[str]:
        order = list(self.order) if self.order else list(family.tiers)
        if len(order) < 2:
            raise SecateurError("the cascade needs at least two tiers (serve.yaml tiers, cheapest first)")
        return order

    def threshold(self, step: int) -> float:
        return self.thresholds[step] if step < len(self.thresholds) else self.thresholds[-1]

    def decide(self, request: RouteRequest, family: FamilyView) -> Decision:
        order = self._order(family)
        if request.stream:
            return family.decision(self.stream_tier or order[0], "cascade-stream")
        return family.decision(order[0], self.kind)

    def after(self, request: RouteRequest, decision: Decision, outcome: Outcome,
              family: FamilyView) -> Optional[Decision]:
        if decision.label not in (self.kind, "escalated") or request.kind == "embedding":
            return None
        order = self._order(family)
        if decision.tier not in order or order.index(decision.tier) == len(order) - 1:
            return None
        step = order.index(decision.tier)
        if confidence(outcome.logprobs, self.quantile) < self.threshold(step):
            return family.decision(order[step + 1], "escalated", decision.attempt + 1)
        return None

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "order": self.order, "quantile": self.quantile, "thresholds": self.thresholds,
                "calibration": self.calibration, "stream_tier": self.stream_tier}

    def named_tiers(self) -> list[str]:
        return list(self.order or []) + ([self.stream_tier] if self.stream_tier else [])


def read_calibration(path: str) -> dict[str, Any]:
    """A cascade calibration file (``secateur route-calibrate --out``): order, quantile, thresholds."""
    import json
    from pathlib import Path

    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError("policy.calibration", f"cannot read '{path}': {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError("policy.calibration", f"'{path}' is not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("kind") != "cascade-calibration" or "thresholds" not in data:
        raise ConfigError("policy.calibration", f"'{path}' is no cascade calibration (write one with "
                                                "`secateur route-calibrate FAMILY --out FILE`)")
    return data


def _header(request: RouteRequest, name: Optional[str]) -> Optional[str]:
    if not name:
        return None
    headers = request.headers or {}
    value = headers.get(name)
    if value is None:
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    return value if value else None


POLICIES: dict[str, type[Policy]] = {"static": StaticPolicy, "fallback": FallbackPolicy, "sticky": StickyPolicy,
                                     "canary": CanaryPolicy, "cascade": CascadePolicy}


def build_policy(spec: Mapping[str, Any], tiers: Mapping[str, str]) -> Policy:
    """The policy serve.yaml's ``policy`` mapping names; its tier names are checked against ``tiers``."""
    options = dict(spec)
    kind = options.pop("kind", "static")
    if ":" in str(kind):
        module, _, name = str(kind).partition(":")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise ConfigError("policy.kind", f"cannot import policy class '{kind}': {exc}") from None
        if not (isinstance(cls, type) and issubclass(cls, Policy)):
            raise ConfigError("policy.kind", f"'{kind}' is not a subclass of secateur.serve.policy.Policy")
    elif kind in POLICIES:
        cls = POLICIES[kind]
    else:
        raise ConfigError("policy.kind", f"unknown policy '{kind}'{did_you_mean(str(kind), POLICIES)}; valid: "
                                         f"{one_of(POLICIES)} or package.module:Class")
    try:
        policy = cls(**options)
    except TypeError as exc:
        import inspect

        valid = [p for p in inspect.signature(cls).parameters if p != "self"]
        bad = next((k for k in options if k not in valid), None)
        hint = f"unknown key{did_you_mean(bad, valid)}; valid keys: kind, {', '.join(valid)}" if bad else str(exc)
        raise ConfigError(f"policy.{bad}" if bad else "policy", hint) from None
    for tier in policy.named_tiers():
        if tier not in tiers:
            raise ConfigError("policy", f"unknown tier '{tier}'{did_you_mean(tier, tiers)}; "
                                        f"tiers: {', '.join(tiers) or 'none (add a tiers: mapping)'}")
    return policy


__all__ = ["Policy", "StaticPolicy", "FallbackPolicy", "StickyPolicy", "CanaryPolicy", "CascadePolicy", "bucket",
           "pick", "confidence", "read_calibration", "Decision", "RouteRequest", "Outcome", "FamilyView",
           "POLICIES", "build_policy"]

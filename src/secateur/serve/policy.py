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
arguments. Sticky A/B (``decide`` hashing a header), canaries (weights) and cascades (``after``)
are subclasses of the same shape.

Policies are shared by all requests (called from the event loop, never concurrently with
themselves within one process); randomness comes from a seeded ``random.Random`` they own.
"""

from __future__ import annotations

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


POLICIES: dict[str, type[Policy]] = {"static": StaticPolicy, "fallback": FallbackPolicy}


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
    named = list(getattr(policy, "weights", {}) or {}) + list(getattr(policy, "order", None) or [])
    for tier in named:
        if tier not in tiers:
            raise ConfigError("policy", f"unknown tier '{tier}'{did_you_mean(tier, tiers)}; "
                                        f"tiers: {', '.join(tiers) or 'none (add a tiers: mapping)'}")
    return policy


__all__ = ["Policy", "StaticPolicy", "FallbackPolicy", "Decision", "RouteRequest", "Outcome", "FamilyView",
           "POLICIES", "build_policy"]

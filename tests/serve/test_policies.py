"""Routing policies' decision logic, each against a plain reference written here: sticky A/B (the
same user, the same tier; shares by weight), canary (the percentage; sticky with a header), the
confidence cascade (escalate exactly when the quantile of the log-probabilities is under the
tier's threshold), the confidence quantile (numpy's), and the threshold calibration (hits the
target rate on the calibration scores). No server, no model."""

from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import pytest

from secateur.errors import ConfigError
from secateur.serve.policy import (CanaryPolicy, CascadePolicy, Decision, FamilyView, Outcome, RouteRequest,
                                   StickyPolicy, build_policy, confidence)
from secateur.serve.routing import threshold_for_rate

TIERS = {"small": "v-small", "mid": "v-mid", "large": "v-large"}
FAMILY = FamilyView("stories", TIERS, {"fast": "v-small"}, "small", "v-small")


def _request(headers=None, stream=False, kind="completion") -> RouteRequest:
    return RouteRequest(model="stories", kind=kind, headers=headers or {}, stream=stream)


def _reference_bucket(key: str, salt: str) -> float:
    return int(hashlib.sha256((salt + "\0" + key).encode()).hexdigest()[:16], 16) / 2 ** 64


def test_sticky_same_user_same_tier_and_shares_follow_the_weights():
    policy = StickyPolicy(weights={"small": 3, "large": 1}, header="X-User", salt="exp1")
    counts = {"small": 0, "large": 0}
    for i in range(4000):
        user = f"user-{i}"
        first = policy.decide(_request({"x-user": user}), FAMILY)
        assert first.label == "sticky" and first.variant == TIERS[first.tier]
        for _ in range(2):  # sticky: again and again the same tier
            assert policy.decide(_request({"x-user": user}), FAMILY).tier == first.tier
        expected = "small" if _reference_bucket(user, "exp1") < 0.75 else "large"
        assert first.tier == expected
        counts[first.tier] += 1
    assert abs(counts["small"] / 4000 - 0.75) < 5 * (0.75 * 0.25 / 4000) ** 0.5  # 5 sigma of a binomial
    # another salt deals the users out again (about a 3/8 chance each of changing tier)
    other = StickyPolicy(weights={"small": 3, "large": 1}, header="x-user", salt="exp2")
    changed = sum(other.decide(_request({"x-user": f"user-{i}"}), FAMILY).tier !=
                  policy.decide(_request({"x-user": f"user-{i}"}), FAMILY).tier for i in range(1000))
    assert 250 < changed < 500
    # no header: random by the same weights, labelled so
    missing = [policy.decide(_request(), FAMILY) for _ in range(400)]
    assert {d.label for d in missing} == {"sticky-random"} and {d.tier for d in missing} == {"small", "large"}


def test_canary_percentage_random_and_sticky():
    for percent in (0, 10, 100):
        policy = CanaryPolicy(canary="large", percent=percent, seed=7)
        reference = random.Random(7)
        for _ in range(2000):
            d = policy.decide(_request(), FAMILY)
            expected = "large" if reference.random() * 100 < percent else "small"  # stable: the family's default
            assert d.tier == expected and d.label == ("canary" if expected == "large" else "stable")
    sticky = CanaryPolicy(canary="mid", stable="large", percent=20, header="x-session", salt="s")
    for i in range(500):
        key = f"s{i}"
        d = sticky.decide(_request({"x-session": key}), FAMILY)
        assert d.tier == ("mid" if _reference_bucket(key, "s") * 100 < 20 else "large")


def _reference_cascade(order, thresholds, q, answers):
    """Walk up the order; stop at the first tier whose answer's q-quantile is >= its threshold."""
    for step, tier in enumerate(order):
        if step == len(order) - 1 or np.quantile(answers[tier], q) >= thresholds[step]:
            return tier, step


def test_cascade_escalates_exactly_under_the_threshold():
    rng = random.Random(0)
    order, thresholds, q = ["small", "mid", "large"], [-2.0, -3.0], 0.2
    policy = CascadePolicy(order=order, threshold=thresholds, quantile=q)
    for _ in range(300):
        answers = {t: [-rng.expovariate(0.7) for _ in range(rng.randint(1, 12))] for t in order}
        route = _request()
        decision = policy.decide(route, FAMILY)
        assert (decision.tier, decision.label) == ("small", "cascade")
        steps = 0
        while True:
            nxt = policy.after(route, decision, Outcome(logprobs=answers[decision.tier]), FAMILY)
            if nxt is None:
                break
            assert nxt.label == "escalated" and nxt.attempt == decision.attempt + 1
            decision, steps = nxt, steps + 1
        assert (decision.tier, steps) == _reference_cascade(order, thresholds, q, answers)
    # pinned requests, streams and embeddings never escalate
    pinned = Decision("small", "v-small", "pinned")
    assert policy.after(_request(), pinned, Outcome(logprobs=[-50.0]), FAMILY) is None
    stream = policy.decide(_request(stream=True), FAMILY)
    assert (stream.tier, stream.label) == ("small", "cascade-stream")
    emb = policy.decide(_request(kind="embedding"), FAMILY)
    assert policy.after(_request(kind="embedding"), emb, Outcome(logprobs=[-50.0]), FAMILY) is None


def test_confidence_is_numpys_linear_quantile():
    rng = random.Random(1)
    for _ in range(200):
        values = [rng.uniform(-10, 0) for _ in range(rng.randint(1, 40))]
        q = rng.random()
        assert confidence(values, q) == pytest.approx(float(np.quantile(values, q)), abs=1e-12)
    assert confidence([], 0.1) == 0.0


def test_threshold_for_rate_hits_the_target_on_the_calibration_scores():
    rng = random.Random(2)
    for n in (1, 7, 200):
        scores = [rng.uniform(-6, 0) for _ in range(n)]
        for rate in (0.0, 0.1, 0.3, 0.5, 0.9, 1.0):
            t = threshold_for_rate(scores, rate)
            assert sum(s < t for s in scores) == round(rate * n), (n, rate)


def test_cascade_reads_a_calibration_file_and_config_errors(tmp_path):
    path = tmp_path / "cascade.json"
    path.write_text(json.dumps({"kind": "cascade-calibration", "order": ["small", "large"], "quantile": 0.25,
                                "thresholds": [-1.5]}))
    policy = build_policy({"kind": "cascade", "calibration": str(path)}, TIERS)
    assert policy.order == ["small", "large"] and policy.thresholds == [-1.5] and policy.quantile == 0.25
    cases = [({"kind": "cascade"}, "needs a threshold"),
             ({"kind": "cascade", "threshold": -1, "order": ["small", "nope"]}, "unknown tier 'nope'"),
             ({"kind": "cascade", "threshold": [-1, -2], "order": ["small", "large"]}, "expected 1 thresholds"),
             ({"kind": "cascade", "threshold": -1, "quantile": 2}, "policy.quantile"),
             ({"kind": "cascade", "calibration": str(tmp_path / "missing.json")}, "cannot read"),
             ({"kind": "sticky", "weights": {"small": -1}}, "expected a number >= 0"),
             ({"kind": "sticky", "weights": {"smal": 1}}, "unknown tier 'smal'"),
             ({"kind": "canary", "canary": "large", "percent": 150}, "policy.percent"),
             ({"kind": "canary", "canary": "larg"}, "unknown tier 'larg'")]
    for spec, expected in cases:
        with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
            build_policy(spec, TIERS)

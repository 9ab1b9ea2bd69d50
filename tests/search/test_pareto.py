"""The front, its layers and the rank correlation, against slow obviously-correct references."""

from __future__ import annotations

import itertools
import random

import pytest

from secateur.search.run import Journal, dominates, pareto_front, pareto_layers, parse_alias, parse_budget, spearman
from secateur.errors import SecateurError


def brute_front(points, tol=0.0):
    out = []
    for k, p in points.items():
        beaten = False
        for j, q in points.items():
            if j == k:
                continue
            same_speed = abs(q["latency"] - p["latency"]) <= tol * p["latency"]
            faster_or_same = q["latency"] <= p["latency"] or same_speed
            strictly = q["quality_drop"] < p["quality_drop"] or q["bytes"] < p["bytes"] or \
                (q["latency"] < p["latency"] and not same_speed)
            if q["quality_drop"] <= p["quality_drop"] and q["bytes"] <= p["bytes"] and faster_or_same and strictly:
                beaten = True
        if not beaten:
            out.append(k)
    return out


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("tol", [0.0, 0.05])
def test_the_front_matches_a_brute_force_reference(seed, tol):
    rng = random.Random(seed)
    points = {f"p{i}": {"quality_drop": rng.choice([0.1, 0.2, 0.5, 1.0]), "latency": rng.uniform(0.5, 1.0),
                        "bytes": rng.choice([0.3, 0.6, 1.0])} for i in range(40)}
    assert sorted(pareto_front(points, tol)) == sorted(brute_front(points, tol))
    layers = pareto_layers(points)
    assert sorted(itertools.chain(*layers)) == sorted(points)
    for earlier, later in zip(layers, layers[1:]):
        assert all(any(dominates(points[a], points[b]) for a in earlier) for b in later)


def slow_spearman(xs, ys):
    n = len(xs)
    rank = lambda v: [sum(1 for w in v if w < x) + (sum(1 for w in v if w == x) - 1) / 2 for x in v]  # noqa: E731
    rx, ry = rank(xs), rank(ys)
    mx, my = sum(rx) / n, sum(ry) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return cov / (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5


@pytest.mark.parametrize("seed", range(5))
def test_spearman_matches_the_definition_with_ties(seed):
    rng = random.Random(seed)
    xs = [rng.choice([1, 2, 3, 4, 5]) for _ in range(12)]
    ys = [x + rng.choice([-2, 0, 1]) for x in xs]
    assert spearman(xs, ys) == pytest.approx(slow_spearman(xs, ys))
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None


def test_budgets_and_aliases_are_read_or_refused_in_one_line():
    assert parse_budget("90s") == 90 and parse_budget("30m") == 1800 and parse_budget("1.5h") == 5400
    assert parse_budget(12) == 12
    for bad in ("soon", "-5m", "0", "inf"):
        with pytest.raises(SecateurError, match="budget"):
            parse_budget(bad)
    name, rules = parse_alias("fast=latency<=0.4x,quality_drop<=1%")
    assert name == "fast" and [r.metric for r in rules] == ["latency", "quality_drop"]
    for bad in ("fast", "=latency<=0.4x", "best=latency<=0.4x", "f=latency<=fast"):
        with pytest.raises(SecateurError):
            parse_alias(bad)


def test_the_journal_ignores_a_torn_last_line(tmp_path):
    journal = Journal(tmp_path / "trials.jsonl")
    journal.append({"id": "a", "ok": True})
    journal.append({"id": "b", "ok": False})
    with open(journal.path, "a") as fh:
        fh.write('{"id": "c", "ok": tr')  # killed mid-write
    assert sorted(journal.read()) == ["a", "b"]


def test_a_speed_within_the_tolerance_is_a_tie():
    good = {"quality_drop": 1.0, "latency": 0.80, "bytes": 1.0}
    lucky = {"quality_drop": 4.0, "latency": 0.78, "bytes": 1.0}   # worse quality, 2.5% faster by chance
    assert sorted(pareto_front({"good": good, "lucky": lucky})) == ["good", "lucky"]
    assert pareto_front({"good": good, "lucky": lucky}, 0.05) == ["good"]
    fast = {"quality_drop": 4.0, "latency": 0.5, "bytes": 1.0}      # really faster: stays
    assert sorted(pareto_front({"good": good, "fast": fast}, 0.05)) == ["fast", "good"]


def test_latencies_within_twice_their_standard_error_are_a_tie():
    good = {"quality_drop": 1.0, "latency": 0.82, "bytes": 0.8, "latency_se": 0.04}
    lucky = {"quality_drop": 4.0, "latency": 0.75, "bytes": 0.8, "latency_se": 0.04}  # 8.5% faster, within 2 SE
    assert pareto_front({"good": good, "lucky": lucky}, 0.05) == ["good"]
    sure = {**lucky, "latency_se": 0.01}
    good_sure = {**good, "latency_se": 0.01}
    assert sorted(pareto_front({"good": good_sure, "lucky": sure}, 0.05)) == ["good", "lucky"]

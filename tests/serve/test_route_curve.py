"""route-eval's curve against a slow, obviously correct reference on synthetic per-prompt numbers:
thresholds from the calibration scores, the gap recovered on log-perplexity (random routing: the
share), on perplexity beside random routing's exact curve, APGR, the hindsight bound; and the
curve kept in the registry and drawn by the report."""

from __future__ import annotations

import math
import random

import pytest

from secateur.serve.routing import _curve, threshold_for_rate

RATES = [round(0.05 * i, 2) for i in range(21)]


def _numbers(seed: int, n: int = 80, informative: bool = False):
    rng = random.Random(seed)
    large = [rng.uniform(1.0, 2.5) for _ in range(n)]
    gain = [rng.expovariate(1 / 0.4) for _ in range(n)]
    small = [a + g for a, g in zip(large, gain)]
    scores = [-g + (0 if informative else rng.gauss(0, 5)) for g in gain]
    calib = [rng.choice(scores) + rng.gauss(0, 0.01) for _ in range(200)]
    sec_small = [rng.uniform(0.01, 0.02) for _ in range(n)]
    sec_large = [rng.uniform(0.02, 0.04) for _ in range(n)]
    return small, large, sec_small, sec_large, scores, calib


def _reference(small, large, sec_small, sec_large, scores, calib):
    n = len(small)
    rows = []
    for rate in RATES:
        ordered = sorted(calib)
        k = round(rate * len(ordered))
        t = ordered[0] - 1 if k == 0 else ordered[-1] + 1 if k == len(ordered) else (ordered[k - 1] + ordered[k]) / 2
        chosen = []
        for i in range(n):
            chosen.append(large[i] if scores[i] < t else small[i])
        m_s, m_l, m_p = sum(small) / n, sum(large) / n, sum(chosen) / n
        share = sum(1 for i in range(n) if scores[i] < t) / n
        cost = sum(sec_small) + sum(sec_large[i] for i in range(n) if scores[i] < t)
        rows.append((share, (m_s - m_p) / (m_s - m_l),
                     (math.exp(m_s) - math.exp(m_p)) / (math.exp(m_s) - math.exp(m_l)),
                     (math.exp(m_s) - math.exp(m_s - share * (m_s - m_l))) / (math.exp(m_s) - math.exp(m_l)), cost))
    return rows


def _trapezoid(points):
    points = sorted(points)
    points = [(0.0, points[0][1])] + points + [(1.0, points[-1][1])]
    return sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in zip(points, points[1:]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_curve_matches_the_reference(seed):
    numbers = _numbers(seed)
    got = _curve(*numbers, RATES)
    ref = _reference(*numbers)
    assert len(got["curve"]) == len(ref)
    for c, (share, rec, rec_ppl, rnd_ppl, cost) in zip(got["curve"], ref):
        assert c["escalated"] == pytest.approx(share)
        assert c["gap_recovered"] == pytest.approx(rec)
        assert c["gap_recovered_ppl"] == pytest.approx(rec_ppl)
        assert c["random_ppl"] == pytest.approx(rnd_ppl)
        assert c["cost_s"] == pytest.approx(cost)
    assert got["apgr"] == pytest.approx(_trapezoid([(r[0], r[1]) for r in ref]))
    # random routing's area on the perplexity scale, integrated numerically
    s, l = got["ppl_small"], got["ppl_large"]
    grid = [i / 10000 for i in range(10001)]
    numeric = sum((s - math.exp(math.log(s) - r * (math.log(s) - math.log(l)))) / (s - l) for r in grid) / len(grid)
    assert got["random_apgr_ppl"] == pytest.approx(numeric, abs=1e-3)
    assert got["random_apgr_ppl"] > 0.5  # exp is convex: perplexity flatters random routing


def test_hindsight_bounds_every_router_and_is_reached_by_a_perfect_signal():
    small, large, ss, sl, scores, calib = _numbers(5, informative=False)
    noisy = _curve(small, large, ss, sl, scores, calib, RATES)
    assert noisy["hindsight_apgr"] >= noisy["apgr"] - 1e-9
    small, large, ss, sl, scores, calib = _numbers(5, informative=True)
    perfect = _curve(small, large, ss, sl, scores, scores, RATES)  # calibrated on the very scores
    assert perfect["apgr"] == pytest.approx(perfect["hindsight_apgr"], abs=0.02)
    assert perfect["apgr"] > 0.75 and perfect["beats_random_10_to_90"]
    # the hindsight curve: starts at 0, ends at 1, never falls below the diagonal
    pts = perfect["hindsight"]
    assert pts[0] == [0.0, 0.0] and pts[-1][0] == 1.0 and pts[-1][1] == pytest.approx(1.0)
    assert all(y >= x - 1e-9 for x, y in pts)


def test_an_uninformative_signal_is_near_random_on_log_perplexity():
    """Scores independent of the gains: the area sits near 0.5 on log-perplexity, while on perplexity it
    sits near random routing's own (above 0.5) area, which is why route-eval reports the log scale."""
    areas, ppl_areas, randoms = [], [], []
    for seed in range(12):
        got = _curve(*_numbers(100 + seed, n=200), RATES)
        areas.append(got["apgr"])
        ppl_areas.append(got["apgr_ppl"] - got["random_apgr_ppl"])
        randoms.append(got["random_apgr_ppl"])
    assert abs(sum(areas) / len(areas) - 0.5) < 0.05
    assert abs(sum(ppl_areas) / len(ppl_areas)) < 0.05
    assert min(randoms) > 0.5


def test_threshold_for_rate_puts_round_rate_n_under_it():
    rng = random.Random(3)
    scores = [rng.uniform(-5, 0) for _ in range(37)]
    for rate in RATES:
        t = threshold_for_rate(scores, rate)
        assert sum(s < t for s in scores) == round(rate * len(scores))


def test_route_eval_keeps_its_curve_in_the_registry_and_the_report_draws_it(serve_home, tmp_path):
    from secateur.registry import Registry
    from secateur.report import collect, render
    from secateur.serve.config import ServeConfig
    from secateur.serve.routing import route_eval

    result = route_eval("stories", ServeConfig.from_dict({"tiers": {"small": "fast", "large": "best"}}),
                        calibration_prompts=8, eval_prompts=8, max_tokens=3, batch=4, home=serve_home)
    with Registry(serve_home) as registry:
        runs = registry.runs("route-eval:stories")
        assert runs and runs[-1].status == "succeeded" and runs[-1].info["apgr"] == pytest.approx(result["apgr"])
        family = collect(registry, "stories")
    assert family["routing"][-1]["curve"] == [dict(c) for c in result["curve"]]
    html = render(family)
    start = html.index('<section id="routing">')
    section = html[start:html.index("</section>", start)]
    assert 'data-plot="routing-share"' in section and 'data-plot="routing-cost"' in section
    assert section.count('class="route-line policy"') == 2 and 'class="route-line hindsight"' in section
    assert f"APGR {result['apgr']:.3f}" in section
    assert '<section id="routing">' not in render({**family, "routing": []})

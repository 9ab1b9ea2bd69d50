"""The report page without a browser: one mark per variant in every plot, rejected ones marked,
strings escaped, nothing fetched, an atomic write, missing pieces shown as "no data"."""

from __future__ import annotations

import copy
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from secateur import report
from secateur.errors import SecateurError
from secateur.report.page import Family

PLOTS = {"pareto-latency-perplexity-tinystories-p1", "pareto-bytes-perplexity-tinystories-p1", "lineage",
         "heatmap-sparsity", "heatmap-bits", "latency-decode-step", "latency-prefill"}


class Page(HTMLParser):
    """Every element with its attributes, and per ``figure.plot`` the marks it holds."""

    VOID = {"meta", "link", "br", "img", "input", "hr", "col", "area", "base", "source", "wbr"}

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.plots: dict[str, list[dict[str, str]]] = {}
        self.texts: list[str] = []
        self._stack: list[tuple[str, str | None]] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = {k: v or "" for k, v in attrs}
        self.elements.append((tag, attrs))
        classes = attrs.get("class", "").split()
        plot = attrs.get("data-plot") if tag == "figure" and "plot" in classes else None
        if plot is not None:
            assert plot not in self.plots, f"two plots named {plot}"
            self.plots[plot] = []
        current = next((p for _, p in reversed(self._stack) if p is not None), None)
        if "mark" in classes and current is not None:
            self.plots[current].append(attrs)
        if tag not in self.VOID:
            self._stack.append((tag, plot))

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID:
            self._stack.pop()

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        while self._stack:  # close up to the matching tag
            if self._stack.pop()[0] == tag:
                break

    def handle_data(self, data):
        self.texts.append(data)


def marks(attrs: list[dict[str, str]], kind: str) -> list[dict[str, str]]:
    return [a for a in attrs if kind in a.get("class", "").split()]


def test_every_plot_holds_one_mark_per_variant_and_one_for_the_base(family):
    page = Page(report.render(family))
    assert set(page.plots) == PLOTS
    names = [v["name"] for v in family["variants"]]
    rejected = {v["name"] for v in family["variants"] if v["status"] == "rejected"}
    for plot, attrs in page.plots.items():
        variants = marks(attrs, "variant")
        assert sorted(a["data-variant"] for a in variants) == sorted(names), plot
        assert {a["data-variant"] for a in marks(attrs, "rejected")} == rejected, plot
        assert [a["data-variant"] for a in marks(attrs, "base")] == ["base"], plot


def test_the_rejected_are_drawn_differently_and_the_front_is_drawn_through_the_admitted(family):
    text = report.render(family)
    for name in ("magnitude-70", "w4-student-g16"):
        for mark in re.findall(rf'<g class="mark variant rejected" data-variant="{name}".*?</g>', text):
            assert 'class="shape rejected"' in mark or "rejected" in mark
    fronts = re.findall(r'<path class="front" d="[^"]+"><title>Pareto front: ([^<]+)</title>', text)
    assert len(fronts) == 2  # latency and bytes
    latency_front, bytes_front = (set(f.split(", ")) for f in fronts)
    # decode step (ms, lower better) vs perplexity (lower better): every admitted point trades one for the other
    assert latency_front == {"student-sparse-w8", "student-sparse", "student", "gptq-w4", "base"}
    # bytes: gptq-w4 (201 kB, 3.97) beats every student variant on both axes
    assert bytes_front == {"gptq-w4", "base"}
    assert not ({"magnitude-70", "w4-student-g16"} & (latency_front | bytes_front))


def test_pareto_front_follows_the_direction_of_quality():
    pts = [("a", 1.0, 10.0), ("b", 2.0, 20.0), ("c", 3.0, 15.0), ("d", 2.0, 20.0)]
    higher = [p[0] for p in report.pareto_front(pts, higher=True)]
    assert higher == ["a", "b", "d"]  # c is beaten by b; ties stay
    lower = [p[0] for p in report.pareto_front(pts, higher=False)]
    assert lower == ["a"]
    assert report.higher_is_better("perplexity", "perplexity") is False
    assert report.higher_is_better("sts", "spearman") is True


def test_an_sts_family_plots_higher_as_better(family):
    for entry in [family["base"], *family["variants"]]:
        ppl = entry["evaluations"][0]["value"]
        entry["evaluations"] = [{"task": "sts", "metric": "spearman", "value": 0.9 - ppl / 100, "protocol": "P2",
                                 "settings": {"data": "stsb"}}]
    text = report.render(family)
    assert "sts spearman (stsb, P2) — higher is better" in text
    assert "↖ better" in text and "↙ better" not in text
    page = Page(text)
    assert "pareto-bytes-sts-spearman-stsb-p2" in page.plots


def test_summary_numbers(family):
    text = report.render(family)
    row = re.search(r'<tr class="admitted"><td class="name">student-sparse-w8.*?</tr>', text).group(0)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
    assert "4.33" in cells and "+18.3%" in cells                 # quality and Δ vs base (4.33 / 3.66)
    assert "1.96 ms" in cells and "1.48×" in cells               # 2.91 / 1.96
    assert "319 kB" in cells and "3.27×" in cells                 # 1,043,456 / 318,944
    assert '<span class="alias">@small</span>' in row


def test_names_and_recipes_are_escaped(family):
    evil = "<script>alert(1)</script>"
    family["variants"][0]["name"] = evil
    for v in family["variants"]:
        if v["parent"] == "student":
            v["parent"] = evil
    family["variants"][0]["aliases"] = ['x"><img src=x onerror=alert(2)>']
    family["variants"][1]["recipe"]["steps"][0]["note"] = "</title></svg><script>alert(3)</script>"
    family["variants"][2]["verdicts"][0]["gate"] = "<b onmouseover=alert(4)>gate</b>"
    family["machine"]["cpu"] = "<iframe src=javascript:alert(5)>"
    family["family"] = "</title><script>alert(6)</script>"
    family["variants"][3]["card"]["quantization"]["bits"] = {"<script>alert(7)</script>": 3}
    family["variants"][4]["layers"]["sparsity"]["<script>alert(8)</script>"] = 0.5
    for entry in [family["base"], *family["variants"]]:  # one quality axis, its data named by a script
        entry["evaluations"][0]["settings"]["data"] = "<script>alert(9)</script>"
    text = report.render(family)
    page = Page(text)
    tags = {tag for tag, _ in page.elements}
    assert "script" not in tags and "img" not in tags and "iframe" not in tags
    assert not [(t, k) for t, attrs in page.elements for k in attrs if k.startswith("on")]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    # the name survives as text: in the marks' data attribute and every plot still counts it
    for plot, attrs in page.plots.items():
        assert evil in [a.get("data-variant") for a in marks(attrs, "variant")], plot
    assert any(evil in t for t in page.texts)


def test_the_page_fetches_nothing(family):
    text = report.render(family)
    assert "http://" not in text and "https://" not in text
    page = Page(text)
    for tag, attrs in page.elements:
        for key in ("src", "srcset", "action", "xlink:href", "poster", "data"):
            assert key not in attrs, (tag, key)
        if "href" in attrs:
            assert attrs["href"].startswith("#") or attrs["href"].startswith("data:"), attrs["href"]
    assert "@import" not in text and "url(" not in text
    assert ('<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
            "style-src 'unsafe-inline'; img-src data:\">") in text


def test_a_url_inside_a_card_is_text_not_a_link(family):
    family["variants"][0]["card"]["base_model"]["path"] = "https://example.invalid/model"
    page = Page(report.render(family))
    assert not [a for _, a in page.elements if any("example.invalid" in v for v in a.values()
                                                   if isinstance(v, str)) and ("href" in a or "src" in a)]


def test_write_is_atomic(family, tmp_path, monkeypatch):
    target = tmp_path / "out" / "report.html"
    assert report.write(family, target) == target
    first = target.read_text(encoding="utf-8")
    assert first == report.render(family)
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode
    # a failing render leaves the old page and no temporary file
    with pytest.raises(SecateurError):
        report.write({"variants": "not a list"}, target)
    assert target.read_text(encoding="utf-8") == first
    # a failure at the rename leaves the old page and cleans up the temporary file
    family["family"] = "renamed"

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        report.write(family, target)
    assert target.read_text(encoding="utf-8") == first
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.html"]


def test_missing_pieces_say_no_data():
    text = report.render({"family": "bare", "variants": [{"name": "a"}, {"name": "b", "parent": "a",
                                                                          "status": "rejected"}]})
    page = Page(text)
    assert set(page.plots) == {"lineage"}  # the lineage needs only names; every other section has no numbers
    assert len(marks(page.plots["lineage"], "variant")) == 2
    for what in ("no model has a quality evaluation", "no per-layer numbers", "no model has a speed measurement",
                 "no gate verdicts recorded", "no compression cards"):
        assert f"no data: {what}" in text, what
    assert report.render({"variants": []}).count('data-plot="lineage"') == 1
    assert "no data" in report.render({"family": "empty"})


def test_partial_numbers_are_drawn_where_they_exist(family):
    family["variants"][0]["speed"] = None
    family["variants"][1]["layers"] = {}
    family["variants"][2]["evaluations"] = []
    del family["variants"][3]["card"]
    page = Page(text := report.render(family))
    count = lambda plot: len(marks(page.plots[plot], "variant"))  # noqa: E731
    assert count("pareto-latency-perplexity-tinystories-p1") == 4  # no speed (0), no quality (2)
    assert count("pareto-bytes-perplexity-tinystories-p1") == 5   # no quality (2)
    assert count("heatmap-sparsity") == 5 and count("latency-decode-step") == 5 and count("lineage") == 6
    assert "not drawn (a number is missing): student, student-sparse-w8" in text
    assert "no per-layer numbers: student-sparse" in text


def test_an_outlier_stays_one_mark_drawn_off_scale(family):
    text = report.render(family)
    assert text.count('class="break"') == 2  # magnitude-70's perplexity (9.84) is far above the rest
    assert "magnitude-70 (9.84)" in text


def test_a_parent_outside_the_family_and_a_cycle_are_drawn(family):
    family["variants"][0]["parent"] = "elsewhere"
    family["variants"].append({"name": "x", "parent": "y"})
    family["variants"].append({"name": "y", "parent": "x"})
    page = Page(text := report.render(family))
    assert len(marks(page.plots["lineage"], "variant")) == len(family["variants"])
    assert "elsewhere: a parent that is not in this family" in text


def test_parent_base_means_the_base_whatever_its_name(family):
    family["base"]["name"] = "stories260K"
    page = Page(text := report.render(family))
    assert [a["data-variant"] for a in marks(page.plots["lineage"], "base")] == ["stories260K"]
    assert "not in this family" not in text


def test_bad_input_is_one_line():
    with pytest.raises(SecateurError, match="variants.* must be a list"):
        report.render({"variants": {"a": 1}})
    with pytest.raises(SecateurError, match="two entries are named 'a'"):
        report.render({"variants": [{"name": "a"}, {"name": "a"}]})
    with pytest.raises(SecateurError, match=r"variants\[0\] has no name"):
        report.render({"variants": [{"status": "admitted"}]})
    with pytest.raises(SecateurError, match="must be a dict"):
        report.render(["not", "a", "dict"])


def test_the_family_is_json_and_the_page_deterministic(family):
    import json

    assert json.loads(json.dumps(family)) == family
    assert report.render(copy.deepcopy(family)) == report.render(family)
    Family(family)  # parses without touching the dict
    assert family == json.loads(json.dumps(family))


def test_the_large_card_is_cut_with_a_note(family):
    family["variants"][0]["card"]["extra"] = {"blob": "z" * 100_000}
    text = report.render(family)
    assert "more characters in compression.json" in text
    assert len(text) < 600_000


def test_docs_describe_every_section():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "report.md").read_text(encoding="utf-8")
    for heading in ("Summary", "Trade-offs", "Lineage", "Per layer", "Latency", "Gates", "Cards", "contract"):
        assert heading.lower() in doc.lower(), heading


def _paths(value, prefix=()):
    if isinstance(value, dict):
        for k, v in value.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


def test_any_piece_missing_or_mistyped_still_renders(family):
    """Thirty seeded mutations of the family (a key dropped, a value turned into None, a string, a
    NaN or an empty container) each still give a page; only the variants list and names are required."""
    import random

    rng = random.Random(23)
    required = lambda p: (p[0] == "variants" and (len(p) <= 2 or p[2:] == ("name",))  # noqa: E731
                          or p in (("base",), ("base", "name")))
    paths = [p for p in _paths(family) if not required(p)]
    for _ in range(30):
        mutated = copy.deepcopy(family)
        for path in rng.sample(paths, 6):
            parent = mutated
            try:
                for step in path[:-1]:
                    parent = parent[step]
                if isinstance(parent, dict) and path[-1] in parent:
                    choice = rng.choice(["drop", None, "text", float("nan"), {}, []])
                    if choice == "drop":
                        del parent[path[-1]]
                    else:
                        parent[path[-1]] = choice
            except (KeyError, IndexError, TypeError):
                continue
        text = report.render(mutated)
        assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")


def test_an_encoder_family_with_many_variants(family):
    """Latency only (an encoder), 24 variants with long names and 12 blocks: still one mark per
    variant per plot, the latency axis named after the encoder's timing."""
    base = family["base"]
    base["speed"] = {"latency_ms_median": 9.0, "latency_ms_p95": 9.8, "latency_ms_p99": 11.0}
    base["evaluations"] = [{"task": "sts", "metric": "spearman", "value": 0.82, "protocol": "P2"}]
    base["layers"] = {"sparsity": {f"encoder.layer.{b}.{k}": 0.0 for b in range(12) for k in ("q", "k", "v", "o")},
                      "bits": {f"encoder.layer.{b}.{k}": 32 for b in range(12) for k in ("q", "k", "v", "o")}}
    variants = []
    for i in range(24):
        variants.append({"name": f"minilm-w8a8-variant-with-a-long-name-{i:02d}", "parent": "base" if i < 4
                         else f"minilm-w8a8-variant-with-a-long-name-{i // 4 - 1:02d}",
                         "status": "rejected" if i % 5 == 0 else "admitted",
                         "evaluations": [{"task": "sts", "metric": "spearman", "value": 0.82 - 0.004 * i,
                                          "protocol": "P2"}],
                         "speed": {"latency_ms_median": 9.0 - 0.2 * i, "latency_ms_p95": 9.5 - 0.2 * i,
                                   "latency_ms_p99": 10.0 - 0.2 * i},
                         "bytes": 90_000_000 - 3_000_000 * i,
                         "layers": {"sparsity": {k: i / 30 for k in base["layers"]["sparsity"]},
                                    "bits": {k: 8 for k in base["layers"]["bits"]}}})
    family["variants"] = variants
    base["bytes"] = 90_000_000
    page = Page(text := report.render(family))
    assert set(page.plots) == {"pareto-latency-sts-spearman-p2", "pareto-bytes-sts-spearman-p2", "lineage",
                               "heatmap-sparsity", "heatmap-bits", "latency-forward"}
    for plot, attrs in page.plots.items():
        assert len(marks(attrs, "variant")) == 24 and len(marks(attrs, "base")) == 1, plot
    assert "forward latency, median (ms) — lower is better" in text and "<th>forward p50</th>" in text


def test_a_searched_family_draws_predicted_and_confirmed_points(family):
    """The search section: every candidate on the predicted plot, the measured ones on the
    confirmed plot at their confirmed speed-up, the front joined; absent without search points."""
    from secateur.report import render

    assert 'id="search"' not in render(family)
    points = [
        {"id": "a1", "label": "rtn-w8", "run_id": "r-old", "front": True,
         "proxies": {"speedup": 9.0, "loss_delta": 0.5}, "measured": {"quality_drop": 0.1, "speedup": 9.0}},
        {"id": "c1", "label": "gptq-w4", "run_id": "r-1", "front": True,
         "proxies": {"speedup": 1.2, "loss_delta": 0.01},
         "measured": {"quality": 5.6, "quality_drop": 0.1, "speedup": 1.1}, "confirmed": {"speedup": 1.3}},
        {"id": "c2", "label": "drop1", "run_id": "r-1", "front": False,
         "proxies": {"speedup": 1.25, "loss_delta": 0.6}, "measured": {"quality": 9.0, "quality_drop": 3.5, "speedup": 1.2}},
        {"id": "c3", "label": "drop1+gptq-w4", "run_id": "r-1", "front": False,
         "proxies": {"speedup": 1.5, "loss_delta": 0.61}, "measured": None},
    ]
    html = render({**family, "search": points})
    section = html[html.index('<section id="search">'):html.index("</section>", html.index('<section id="search">'))]
    predicted = section[section.index('data-plot="search-predicted"'):section.index('data-plot="search-confirmed"')]
    confirmed = section[section.index('data-plot="search-confirmed"'):]
    # only the latest search (r-1): three priced, two measured, one on the front
    assert predicted.count('class="search-point') == 3 and 'data-candidate="a1"' not in section
    assert confirmed.count('class="search-point') == 2 and 'data-candidate="c3"' not in confirmed
    assert predicted.count('class="search-point unmeasured"') == 1
    assert confirmed.count('class="search-point front"') == 1 and "3 candidates priced by the proxies, 2 built" in section
    assert "speed-up 1.3x" in confirmed  # the confirmed speed-up, not the trial's 1.1


def _exits_section(html: str) -> str:
    start = html.index('<section id="exits">')
    return html[start:html.index("</section>", start)]


def test_the_exit_curves_are_drawn_beside_the_static_variants(family, exits):
    """A variant with exit heads gets the Early exit section: its curve against mean blocks (every
    priced threshold plus the model without exits) and against the measured speed-up (the thresholds
    the speed evaluation timed), with the other variants as squares at their block counts and speed-ups."""
    EXIT_THRESHOLDS, exit_variant = exits.EXIT_THRESHOLDS, exits.exit_variant

    assert 'id="exits"' not in report.render(family)
    family["variants"].append(exit_variant("exits <b>"))
    html = report.render(family)
    section = _exits_section(html)
    blocks, speed = section.split('data-plot="exit-speed"')
    assert 'data-plot="exit-blocks"' in blocks
    assert blocks.count('class="exit-point') == len(EXIT_THRESHOLDS) + 1
    assert speed.count('class="exit-point') == 5 + 1          # five timed thresholds and the model without exits
    assert blocks.count('class="static-point"') == 7 and speed.count('class="static-point"') == 7
    assert "exits &lt;b&gt;" in section and "exits <b>" not in section
    assert 'data-variant="student"' in blocks and "4 blocks" in blocks   # a static variant at its block count
    assert "threshold 0.9: 4.2 blocks" in blocks and "measured speed-up 1.01×" in speed
    assert "held-out split of the training text: 8 windows of 256 tokens" in section


def test_a_curve_in_an_unexpected_shape_draws_nothing(family, exits):
    exit_variant = exits.exit_variant

    variant = exit_variant()
    variant["card"]["history"][0]["result"]["curve"] = {"metric": "bleu", "points": [{"threshold": None}]}
    family["variants"].append(variant)
    assert 'id="exits"' not in report.render(family)
    variant["card"]["history"][0]["result"]["curve"] = {"metric": "perplexity", "points": "none"}
    assert 'id="exits"' not in report.render(family)
    variant["card"]["history"][0]["result"]["curve"] = {"metric": "perplexity",
                                                        "points": [{"threshold": 0.5, "mean_blocks": "x"}]}
    assert 'id="exits"' not in report.render(family)


def test_an_exit_variant_in_the_registry_gets_its_curves(tmp_path, monkeypatch):
    """End to end: a tiny Llama with exit heads trained by the early_exit step, saved and added to a
    registry beside its base, its speed evaluated (which times the exits) and recorded; the report
    collected from the registry draws its curve against blocks from the card and against the speed-up
    from the recorded evaluation."""
    import torch

    from secateur.api import compress_
    from secateur.artifacts import load, save
    from secateur.data import CalibrationSet
    from secateur.evaluate import evaluate
    from secateur.recipe import Recipe
    from secateur.registry import Registry
    from secateur.testing import tiny_model

    monkeypatch.setenv("SECATEUR_HOME", str(tmp_path / "home"))
    model = tiny_model("llama")
    base_dir = save(model, tmp_path / "base")
    windows = torch.randint(3, model.config.vocab_size, (20, 24), generator=torch.Generator().manual_seed(0))
    recipe = Recipe.from_dict({"steps": [{"method": "early_exit", "steps": 3, "batch_size": 4, "lr": 1e-3,
                                          "seq_len": 24, "eval_every": 0, "holdout": 0.2, "curve": [0.0, 0.5, 1.0]}]})
    compress_(model, recipe, data=CalibrationSet(windows, "random"))
    exit_dir = save(model, tmp_path / "exits", recipe=recipe)
    with Registry() as reg:
        reg.add(base_dir, "tiny", "base")
        variant = reg.add(exit_dir, "tiny", "exits")
        loaded = load(exit_dir).model
        reg.record_evaluation(variant, evaluate(loaded, None, "speed", prompt_len=4, new_tokens=12, runs=1, warmup=1,
                                                exit_thresholds=(0.0, 0.5, 1.0)))
        family = report.collect(reg, "tiny")
    section = _exits_section(report.render(family))
    blocks, speed = section.split('data-plot="exit-speed"')
    assert blocks.count('class="exit-point') == 4 and speed.count('class="exit-point') == 4
    assert 'data-variant="exits"' in blocks and "measured speed-up" in speed

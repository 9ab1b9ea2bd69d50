"""The report in a real headless browser: Debian's chromium (``apt-get install -y chromium``),
driven by Playwright with that system browser (``pip install playwright``, never ``playwright
install``). The page loads from a file:// URL with no console error, no page error and no request
but its own; every plot holds one mark per variant; a hostile variant name stays text; a full-page
screenshot is kept (copied to ``$SECATEUR_TEST_ARTIFACTS`` when that is set)."""

from __future__ import annotations

import os
from contextlib import contextmanager
import shutil
from pathlib import Path

import pytest

from secateur import report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                                                         "(apt-get install -y chromium); CI installs it")

PLOTS_JS = """() => Array.from(document.querySelectorAll('figure.plot')).map(f => ({
    plot: f.dataset.plot,
    variants: Array.from(f.querySelectorAll('.mark.variant')).map(m => m.dataset.variant),
    rejected: Array.from(f.querySelectorAll('.mark.variant.rejected')).map(m => m.dataset.variant),
    base: f.querySelectorAll('.mark.base').length,
    drawn: Array.from(f.querySelectorAll('.mark')).filter(m => {
        const b = m.getBoundingClientRect(); return b.width > 0 && b.height > 0; }).length,
    hover: Object.fromEntries(Array.from(f.querySelectorAll('.mark')).map(
        m => [m.dataset.variant, (m.querySelector(':scope > title') || {}).textContent || '']))
}))"""


def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:  # chromium is here, so the test must run: say what is missing
        pytest.fail("the browser test needs Playwright: pip install 'secateur[report]' (or: pip install playwright); "
                    "it drives the system chromium, so no `playwright install`")
    return sync_playwright


@contextmanager
def opened(path, **page_options):
    """The page at ``path`` loaded in the system chromium, with a :class:`Watch` on it."""
    sync_playwright = _playwright()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])  # CI runs as root
        try:
            page = browser.new_page(**page_options)
            watch = Watch(page)
            page.goto(Path(path).as_uri(), wait_until="load")
            yield page, watch
        finally:
            browser.close()


class Watch:
    """Console messages, page errors, dialogs and requests of one page."""

    def __init__(self, page):
        self.console, self.errors, self.dialogs, self.requests = [], [], [], []
        page.on("console", lambda m: self.console.append((m.type, m.text)))
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        page.on("request", lambda r: self.requests.append(r.url))

    def check(self, url: str) -> None:
        assert [m for m in self.console if m[0] in ("error", "assert")] == []
        assert self.errors == [] and self.dialogs == []
        assert [u for u in self.requests if u != url and not u.startswith("data:")] == []


def test_the_report_renders_in_headless_chromium(family, tmp_path):
    path = report.write(family, tmp_path / "report.html")
    names = sorted(v["name"] for v in family["variants"])
    rejected = sorted(v["name"] for v in family["variants"] if v["status"] == "rejected")
    with opened(path, viewport={"width": 1400, "height": 900}) as (page, watch):
        plots = page.evaluate(PLOTS_JS)
        assert page.evaluate("() => document.scripts.length") == 0
        assert len(plots) == 7
        for plot in plots:
            assert sorted(plot["variants"]) == names, plot["plot"]
            assert sorted(plot["rejected"]) == rejected, plot["plot"]
            assert plot["base"] == 1, plot["plot"]
            assert plot["drawn"] == len(names) + 1, plot["plot"]  # each mark has a box on the page
        pareto = next(p for p in plots if p["plot"].startswith("pareto-latency"))
        hover = pareto["hover"]["student-sparse-w8"]
        assert "step 1: rtn(bits=8, strategy=channel)" in hover and "perplexity (tinystories, P1): 4.33" in hover
        assert "failed perplexity(tinystories) drop <= 40% vs base" in pareto["hover"]["magnitude-70"]
        page.hover('.mark.variant[data-variant="gptq-w4"]')  # hovering works and raises nothing
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        watch.check(path.as_uri())
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width == 1400 and height > 2500, (width, height)
    keep = os.environ.get("SECATEUR_TEST_ARTIFACTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, Path(keep) / "report.png")
        shutil.copyfile(path, Path(keep) / "report.html")


def test_a_hostile_name_stays_text_in_the_browser(family, tmp_path):
    evil = "<script>alert(1)</script>"
    family["variants"][1]["name"] = evil
    family["variants"][2]["parent"] = evil
    family["variants"][0]["aliases"] = ['"><img src=x onerror=alert(2)>']
    path = report.write(family, tmp_path / "hostile.html")
    with opened(path) as (page, watch):
        assert page.evaluate("() => document.scripts.length + document.images.length") == 0
        assert evil in page.evaluate("() => document.body.innerText")
        for plot in page.evaluate(PLOTS_JS):
            assert evil in plot["variants"], plot["plot"]
        watch.check(path.as_uri())


def test_the_watch_sees_a_blocked_load(family, tmp_path):
    """The checks above can fail: the same page with one external image gets a console error
    (the page's Content-Security-Policy refuses the load) and the request is seen."""
    text = report.render(family).replace("<main>", '<main><img src="http://127.0.0.1:9/x.png" alt="">', 1)
    path = tmp_path / "leaky.html"
    path.write_text(text, encoding="utf-8")
    with opened(path) as (page, watch):
        with pytest.raises(AssertionError):
            watch.check(path.as_uri())
        assert any("Content Security Policy" in m[1] for m in watch.console if m[0] == "error"), watch.console


def test_the_routing_curves_are_drawn_in_the_browser(family, tmp_path):
    """A family with a routing evaluation: both routing plots are on the page, their lines have a
    size, the cascade's points sit inside the plot area, and the page raises nothing."""
    curve = [{"target_rate": r / 10, "escalated": r / 10, "gap_recovered": min(1.0, (r / 10) ** 0.7),
              "cost_vs_large": 0.5 + r / 10, "perplexity": 5.0 - r / 10} for r in range(11)]
    routing = {"small": {"tier": "small", "perplexity": 5.3}, "large": {"tier": "large", "perplexity": 4.5},
               "prompts": {"evaluation": 500}, "curve": curve, "apgr": 0.61, "hindsight_apgr": 0.72,
               "hindsight": [[0.0, 0.0], [0.5, 0.9], [1.0, 1.0]], "cost_at_80pct_vs_large": 1.1}
    path = report.write({**family, "routing": [routing]}, tmp_path / "report.html")
    with opened(path, viewport={"width": 1400, "height": 900}) as (page, watch):
        drawn = page.evaluate("""() => Array.from(document.querySelectorAll('#routing figure.plot')).map(f => {
            const svg = f.querySelector('svg').getBoundingClientRect();
            const inside = Array.from(f.querySelectorAll('circle')).filter(c => {
                const b = c.getBoundingClientRect();
                return b.left >= svg.left && b.right <= svg.right && b.top >= svg.top && b.bottom <= svg.bottom; });
            return {plot: f.dataset.plot, lines: Array.from(f.querySelectorAll('path.line')).filter(p => {
                const b = p.getBoundingClientRect(); return b.width > 0 && b.height > 0; }).length,
                points: f.querySelectorAll('circle').length, inside: inside.length}; })""")
        watch.check(path.as_uri())
    assert [d["plot"] for d in drawn] == ["routing-share", "routing-cost"]
    assert drawn[0]["lines"] == 3 and drawn[1]["lines"] == 1
    assert all(d["points"] == 11 and d["inside"] == 11 for d in drawn)


def test_the_exit_curves_are_drawn_in_the_browser(family, tmp_path, exits):
    """A family with an exit variant: both exit plots are on the page, the curve's line has a size,
    every point (the curve's circles, the static variants' squares) sits inside its plot, and the
    page raises nothing."""
    EXIT_THRESHOLDS, exit_variant = exits.EXIT_THRESHOLDS, exits.exit_variant

    family["variants"].append(exit_variant())
    path = report.write(family, tmp_path / "report.html")
    with opened(path, viewport={"width": 1400, "height": 900}) as (page, watch):
        drawn = page.evaluate("""() => Array.from(document.querySelectorAll('#exits figure.plot')).map(f => {
            const svg = f.querySelector('svg').getBoundingClientRect();
            const marks = Array.from(f.querySelectorAll('circle.exit-point, .static-point rect'));
            const inside = marks.filter(c => {
                const b = c.getBoundingClientRect();
                return b.width > 0 && b.left >= svg.left && b.right <= svg.right && b.top >= svg.top
                    && b.bottom <= svg.bottom; });
            return {plot: f.dataset.plot, lines: Array.from(f.querySelectorAll('path.line')).filter(p => {
                const b = p.getBoundingClientRect(); return b.width > 0 && b.height > 0; }).length,
                points: f.querySelectorAll('circle.exit-point').length,
                statics: f.querySelectorAll('.static-point rect').length,
                marks: marks.length, inside: inside.length}; })""")
        watch.check(path.as_uri())
    assert [d["plot"] for d in drawn] == ["exit-blocks", "exit-speed"]
    assert [d["lines"] for d in drawn] == [1, 1]
    assert [d["points"] for d in drawn] == [len(EXIT_THRESHOLDS) + 1, 6] and [d["statics"] for d in drawn] == [7, 7]
    assert all(d["inside"] == d["marks"] for d in drawn), drawn

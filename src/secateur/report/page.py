"""The report page: one self-contained HTML file drawn from a family dict (the contract is in
:mod:`secateur.report`'s docstring and ``docs/report.md``).

Everything is inline: the CSS, the SVG plots (drawn here, by :mod:`.svg`), no script, no font, no
image, nothing fetched; a Content-Security-Policy of ``default-src 'none'`` makes the browser refuse
any load the page might attempt. Every string that comes from the family (names, recipes, cards) is
escaped. Each plot is a ``<figure class="plot" data-plot="...">`` whose marks are
``<g class="mark variant" data-variant="NAME">`` (``mark variant rejected`` for a rejected one,
``mark base`` for the base), each holding an SVG ``<title>``: the hover text.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import SecateurError
from .layers import layer_order, split_layer
from .svg import (Scale, axes, domain, esc, fmt, fmt_bytes, fmt_ms, fmt_pct, fmt_ratio, number, overlaps, ramp,
                  shorten, shorten_name, text_width, tick_label, x_grid)

HIGHER_IS_BETTER = {"perplexity": False, "sts": True}
LOWER_IS_BETTER_METRICS = {"perplexity", "loss", "nll", "wer", "cer", "error", "bits_per_byte", "bpb"}
LATENCIES = (("latency_ms", "forward latency", "forward"), ("decode_step_ms", "decode step latency", "decode-step"),
             ("prefill_ms", "prefill latency", "prefill"))  # speed keys' prefix, in words, in plot ids
LATENCY_WORDS = {prefix: words for prefix, words, _ in LATENCIES}
CARD_JSON_LIMIT = 60_000  # characters of a card's JSON shown in full; longer ones are cut, saying so

SPARSITY_RAMP = ((246, 248, 252), (189, 215, 238), (107, 174, 214), (33, 113, 181), (8, 48, 107))
BIT_COLOURS = {1: "#3f0d12", 2: "#7f2704", 3: "#a63603", 4: "#e6550d", 5: "#f16913", 6: "#fd8d3c", 7: "#fdae6b",
               8: "#fdd0a2"}
WIDE_BITS = "#e7e9ee"  # 16 or 32 bits: not quantized
NO_DATA = "#c4c8d0"


def higher_is_better(task: str, metric: str) -> bool:
    """Perplexity (and losses, error rates) go down when a model is better; STS and accuracies go up."""
    if task in HIGHER_IS_BETTER:
        return HIGHER_IS_BETTER[task]
    return not ({str(task).lower(), str(metric).lower()} & LOWER_IS_BETTER_METRICS)


# --- the family, read defensively ---------------------------------------------------------------

@dataclass
class Entry:
    name: str
    status: str
    parent: Optional[str]
    id: Optional[str] = None
    aliases: list[str] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    card: dict[str, Any] = field(default_factory=dict)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    speed: dict[str, Any] = field(default_factory=dict)
    verdicts: list[dict[str, Any]] = field(default_factory=list)
    bytes: Optional[float] = None
    layers: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def is_base(self) -> bool:
        return self.status == "base"

    @property
    def mark_class(self) -> str:
        if self.is_base:
            return "mark base"
        return "mark variant rejected" if self.status == "rejected" else "mark variant"


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _entry(raw: Any, where: str, base: bool = False) -> Entry:
    if not isinstance(raw, dict):
        raise SecateurError(f"report: {where} must be a dict, got {type(raw).__name__}")
    name = "base" if base and raw.get("name") is None else raw.get("name")
    if not isinstance(name, str) or not name:
        raise SecateurError(f"report: {where} has no name (a non-empty string)")
    card = _dict(raw.get("card"))
    recipe = _dict(raw.get("recipe")) or _dict(card.get("recipe"))
    steps = [s for s in _list(recipe.get("steps")) if isinstance(s, dict)]
    summary: dict[str, Any] = {}
    if card:
        from ..artifacts.card import card_summary

        try:
            summary = card_summary(card)
        except Exception:  # a card in an unexpected shape still gets a page; only its summary is lost
            summary = {}
    size = number(raw.get("bytes"))
    if size is None and summary.get("weights_bytes"):
        size = float(summary["weights_bytes"])
    status = "base" if base else str(raw.get("status") or "admitted")
    return Entry(name=name, status=status, parent=None if base else str(raw.get("parent") or "base"),
                 id=raw.get("id") if isinstance(raw.get("id"), str) else None,
                 aliases=[str(a) for a in _list(raw.get("aliases"))], steps=steps, card=card,
                 evaluations=[e for e in _list(raw.get("evaluations")) if isinstance(e, dict)],
                 speed=_dict(raw.get("speed")), verdicts=[v for v in _list(raw.get("verdicts")) if isinstance(v, dict)],
                 bytes=size, layers=_dict(raw.get("layers")), summary=summary)


@dataclass(frozen=True)
class QualityKey:
    task: str
    metric: str
    protocol: Optional[str]
    data: Optional[str]

    @property
    def higher(self) -> bool:
        return higher_is_better(self.task, self.metric)

    def label(self) -> str:
        name = self.task if self.metric in (self.task, "", None) else f"{self.task} {self.metric}"
        extra = ", ".join(x for x in (self.data, self.protocol) if x)
        return f"{name} ({extra})" if extra else name

    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.label().lower()).strip("-")


def _data_name(evaluation: dict[str, Any]) -> Optional[str]:
    data = _dict(evaluation.get("settings")).get("data", _dict(evaluation.get("spec")).get("data"))
    if isinstance(data, dict):
        data = data.get("name") or data.get("source") or json.dumps(data, sort_keys=True)
    return str(data) if data not in (None, "") else None


def _key(evaluation: dict[str, Any]) -> Optional[QualityKey]:
    task = evaluation.get("task")
    if not isinstance(task, str) or task == "speed" or number(evaluation.get("value")) is None:
        return None
    protocol = evaluation.get("protocol")
    return QualityKey(task, str(evaluation.get("metric") or task), protocol if isinstance(protocol, str) else None,
                      _data_name(evaluation))


class Family:
    """The family dict, checked and indexed: entries (base first), quality keys, the latency used."""

    def __init__(self, family: Any):
        if not isinstance(family, dict):
            raise SecateurError(f"report: the family must be a dict, got {type(family).__name__}")
        variants = family.get("variants")
        if variants is None:
            variants = []
        if not isinstance(variants, list):
            raise SecateurError(f"report: 'variants' must be a list, got {type(variants).__name__}")
        self.name = str(family.get("family") or "family")
        self.machine = _dict(family.get("machine"))
        self.created = family.get("created")
        self.base = _entry(family.get("base") or {"name": "base"}, "base", base=True)
        self.variants = [_entry(v, f"variants[{i}]") for i, v in enumerate(variants)]
        seen: set[str] = {self.base.name}
        for v in self.variants:
            if v.name in seen:
                raise SecateurError(f"report: two entries are named '{v.name}'; variant names must be unique")
            seen.add(v.name)
        for v in self.variants:  # "base" names the base whatever the base is called
            if v.parent == "base" and self.base.name != "base" and "base" not in seen:
                v.parent = self.base.name
        self.entries = [self.base, *self.variants]
        self.by_name = {e.name: e for e in self.entries}
        search = family.get("search")
        self.search = [p for p in search if isinstance(p, dict)] if isinstance(search, list) else []
        routing = family.get("routing")
        self.routing = [r for r in routing if isinstance(r, dict) and isinstance(r.get("curve"), list)] \
            if isinstance(routing, list) else []
        keys: list[QualityKey] = []
        for e in self.entries:
            for ev in e.evaluations:
                k = _key(ev)
                if k is not None and k not in keys:
                    keys.append(k)
        self.keys = keys
        self.latency = next((p for p, _, _ in LATENCIES if any(number(e.speed.get(f"{p}_median")) is not None
                                                            for e in self.entries)), None)

    def quality(self, entry: Entry, key: QualityKey) -> Optional[float]:
        """The model's number on the axis ``key``: its last evaluation there (the newest, in time order)."""
        for ev in reversed(entry.evaluations):
            if _key(ev) == key:
                return number(ev.get("value"))
        return None

    def delta(self, entry: Entry, key: QualityKey) -> Optional[float]:
        """Relative change vs the base, in percent (positive: the number went up)."""
        v, b = self.quality(entry, key), self.quality(self.base, key)
        if v is None or b is None or b == 0:
            return None
        return 100.0 * (v - b) / abs(b)

    def latency_ms(self, entry: Entry, stat: str = "median") -> Optional[float]:
        return number(entry.speed.get(f"{self.latency}_{stat}")) if self.latency else None

    def speedup(self, entry: Entry) -> Optional[float]:
        v, b = self.latency_ms(entry), self.latency_ms(self.base)
        return b / v if v and b else None

    def size_ratio(self, entry: Entry) -> Optional[float]:
        return self.base.bytes / entry.bytes if entry.bytes and self.base.bytes else None


def _step_text(step: dict[str, Any]) -> str:
    args = ", ".join(f"{k}={_short_value(v)}" for k, v in step.items() if k != "method")
    return f"{step.get('method', '?')}({args})"


def _short_value(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return shorten(json.dumps(value, sort_keys=True, separators=(",", ":")), 60)
    return str(value)


def _methods(entry: Entry) -> str:
    return " → ".join(str(s.get("method", "?")) for s in entry.steps) or "—"


def _failed(entry: Entry) -> list[dict[str, Any]]:
    return [v for v in entry.verdicts if v.get("passed") is False]


def _hover(fam: Family, e: Entry) -> str:
    """The tooltip of a variant's marks: its recipe and numbers, one fact a line."""
    head = f"{e.name} — {e.status}" + (f" [{e.id}]" if e.id else "")
    lines = [head]
    if e.aliases:
        lines.append("aliases: " + ", ".join("@" + a for a in e.aliases))
    if not e.is_base:
        lines.append(f"parent: {e.parent}")
        lines.extend(f"step {i + 1}: {_step_text(s)}" for i, s in enumerate(e.steps))
    for key in fam.keys:
        q = fam.quality(e, key)
        if q is not None:
            d = fam.delta(e, key)
            lines.append(f"{key.label()}: {fmt(q)}" + (f" ({fmt_pct(d)} vs base)" if d is not None and not e.is_base
                                                      else ""))
    for prefix, label, _ in LATENCIES:
        p50 = number(e.speed.get(f"{prefix}_median"))
        if p50 is not None:
            p95, p99 = e.speed.get(f"{prefix}_p95"), e.speed.get(f"{prefix}_p99")
            lines.append(f"{label}: p50 {fmt_ms(p50)}, p95 {fmt_ms(p95)}, p99 {fmt_ms(p99)}")
    if number(e.speed.get("decode_tokens_per_s")) is not None:
        lines.append(f"decode: {fmt(e.speed['decode_tokens_per_s'])} tokens/s")
    if fam.speedup(e) is not None and not e.is_base:
        lines.append(f"speedup vs base: {fmt_ratio(fam.speedup(e))}")
    if e.bytes is not None:
        ratio = fam.size_ratio(e)
        lines.append(f"weights: {fmt_bytes(e.bytes)}" + (f" ({fmt_ratio(ratio)} smaller)" if ratio and not e.is_base
                                                         else ""))
    if number(e.speed.get("peak_rss_mib")) is not None:
        lines.append(f"peak RSS: {fmt(e.speed['peak_rss_mib'])} MiB")
    if e.verdicts:
        failed = _failed(e)
        lines.append(f"gates: {len(e.verdicts) - len(failed)}/{len(e.verdicts)} passed")
        lines.extend(f"  failed {v.get('gate', '?')}: {_verdict_numbers(v)}" for v in failed)
    return "\n".join(lines)


def _mark(e: Entry, fam: Family, body: str) -> str:
    return (f'<g class="{e.mark_class}" data-variant="{esc(e.name)}" data-status="{esc(e.status)}" tabindex="0">'
            f"<title>{esc(_hover(fam, e))}</title>{body}</g>")


def _figure(plot_id: str, title: str, svg: str, note: str = "") -> str:
    return (f'<figure class="plot" data-plot="{esc(plot_id)}"><figcaption>{esc(title)}</figcaption>'
            f'<div class="scroll">{svg}</div>{note}</figure>')


def _no_data(what: str) -> str:
    return f'<p class="nodata">no data: {esc(what)}</p>'


def _missing(names: list[str], why: str) -> str:
    if not names:
        return ""
    return f'<p class="missing">{esc(why)}: {esc(", ".join(names))}</p>'


# --- Pareto plots -------------------------------------------------------------------------------

def _shape(e: Entry, x: float, y: float, front: bool) -> str:
    if e.is_base:
        return (f'<path class="shape base" d="M{x:.1f},{y - 7:.1f}L{x + 7:.1f},{y:.1f}L{x:.1f},{y + 7:.1f}'
                f'L{x - 7:.1f},{y:.1f}Z"/>')
    if e.status == "rejected":
        return (f'<circle class="shape rejected" cx="{x:.1f}" cy="{y:.1f}" r="6"/>'
                f'<path class="cross" d="M{x - 4:.1f},{y - 4:.1f}L{x + 4:.1f},{y + 4:.1f}M{x - 4:.1f},{y + 4:.1f}'
                f'L{x + 4:.1f},{y - 4:.1f}"/>')
    return f'<circle class="shape admitted{" front" if front else ""}" cx="{x:.1f}" cy="{y:.1f}" r="6"/>'


def pareto_front(points: list[tuple[Any, float, float]], higher: bool) -> list[tuple[Any, float, float]]:
    """The non-dominated ``(item, x, quality)`` points, x ascending: none other is at most as large
    in x and at least as good in quality (better in one of them)."""
    def at_least(a: float, b: float) -> bool:
        return a >= b if higher else a <= b

    front = []
    for p in points:
        dominated = any(o is not p and o[1] <= p[1] and at_least(o[2], p[2]) and (o[1] < p[1] or o[2] != p[2])
                        for o in points)
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: (p[1], p[2]))


def _scatter(fam: Family, plot_id: str, title: str, key: QualityKey, xget: Callable[[Entry], Optional[float]],
             x_label: str, x_kind: str = "") -> str:
    width, height, left, right, top, bottom = 600, 400, 74, 24, 18, 52
    points, missing = [], []
    for e in fam.entries:
        x, y = xget(e), fam.quality(e, key)
        if x is None or y is None or x <= 0:
            missing.append(e.name)
        else:
            points.append((e, x, y))
    if not points:
        return _figure_empty(title, f"no entry has both numbers ({', '.join(missing)})")
    core = [p for p in points if p[0].status != "rejected"] or points
    xlo, xhi, xlog = domain(_within([p[1] for p in core], [p[1] for p in points]), include_zero=True)
    ylo, yhi, ylog = domain(_within([p[2] for p in core], [p[2] for p in points]))
    # points far outside the others' range sit in a band at the edge, past a dashed break, their
    # number in the label: one broken variant must not squash the rest
    band = 30
    off_high, off_low = any(p[2] > yhi for p in points), any(p[2] < ylo for p in points)
    off_right = any(p[1] > xhi for p in points)
    area = (left, top, width - right, height - bottom)
    xs = Scale(xlo, xhi, left, area[2] - (band + 16 if off_right else 0), xlog)
    ys = Scale(ylo, yhi, area[3] - (band if off_low else 0), top + (band if off_high else 0), ylog)

    def position(x: float, y: float) -> tuple[float, float]:
        px = area[2] - (band + 16) / 2 if x > xhi else xs(max(x, xlo))
        py = top + band / 2 - 4 if y > yhi else (area[3] - band / 2 + 4 if y < ylo else ys(y))
        return px, py

    direction = "higher is better" if key.higher else "lower is better"
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
             f'aria-label="{esc(title)}">',
             axes(xs, ys, x_label=x_label + " — lower is better", y_label=f"{key.label()} — {direction}",
                  x_kind=x_kind, width=width, height=height)]
    if off_high:
        parts.append(f'<line class="break" x1="{left}" y1="{ys.end - 6:.1f}" x2="{area[2]}" y2="{ys.end - 6:.1f}"/>'
                     f'<text class="break-label" x="{left - 6}" y="{top + band / 2:.1f}" text-anchor="end">'
                     f'off scale</text>')
    if off_low:
        parts.append(f'<line class="break" x1="{left}" y1="{ys.start + 6:.1f}" x2="{area[2]}" y2="{ys.start + 6:.1f}"/>'
                     f'<text class="break-label" x="{left - 6}" y="{area[3] - band / 2 + 4:.1f}" text-anchor="end">'
                     f'off scale</text>')
    if off_right:
        parts.append(f'<line class="break" x1="{xs.end + 8:.1f}" y1="{top}" x2="{xs.end + 8:.1f}" y2="{area[3]}"/>')
    corner_y = ys.end + 14 if key.higher else ys.start - 8
    parts.append(f'<text class="hint" x="{left + 8}" y="{corner_y:.1f}">{"↖" if key.higher else "↙"} better</text>')
    candidates = [p for p in points if p[0].status in ("admitted", "base")]
    front = pareto_front(candidates, key.higher)
    on_front = {id(p[0]) for p in front}
    if len(front) > 1:
        steps = [position(front[0][1], front[0][2])]
        for (_, _, q0), (_, x1, q1) in zip(front, front[1:]):
            steps += [(position(x1, q1)[0], position(x1, q0)[1]), position(x1, q1)]
        d = "M" + "L".join(f"{px:.1f},{py:.1f}" for px, py in steps)
        parts.append(f'<path class="front" d="{d}"><title>Pareto front: '
                     f'{esc(", ".join(p[0].name for p in front))}</title></path>')
    spots = {id(e): position(x, y) for e, x, y in points}
    placed = [(px - 7, py - 7, px + 7, py + 7) for px, py in spots.values()]
    order = sorted(points, key=lambda p: {"rejected": 0, "admitted": 1, "base": 2}.get(p[0].status, 1))
    labels = []
    for e, x, y in order:
        px, py = spots[id(e)]
        parts.append(_mark(e, fam, _shape(e, px, py, id(e) in on_front)))
        label = shorten_name(e.name, 28)
        if not (ylo <= y <= yhi):
            label += f" ({fmt(y, 3)})"
        elif x > xhi:
            label += f" ({tick_label(x, x_kind)})"
        w = text_width(label, 11)
        for ax, ay, anchor, box in ((px + 9, py + 4, "start", (px + 9, py - 7, px + 9 + w, py + 5)),
                                    (px - 9, py + 4, "end", (px - 9 - w, py - 7, px - 9, py + 5)),
                                    (px, py - 10, "middle", (px - w / 2, py - 20, px + w / 2, py - 8)),
                                    (px, py + 19, "middle", (px - w / 2, py + 8, px + w / 2, py + 20)),
                                    (px - 4, py - 10, "end", (px - 4 - w, py - 20, px - 4, py - 8)),
                                    (px - 4, py + 19, "end", (px - 4 - w, py + 8, px - 4, py + 20)),
                                    (px + 4, py - 10, "start", (px + 4, py - 20, px + 4 + w, py - 8)),
                                    (px + 4, py + 19, "start", (px + 4, py + 8, px + 4 + w, py + 20))):
            inside = box[0] >= area[0] and box[2] <= area[2] and box[1] >= area[1] and box[3] <= area[3]
            own = [bx for bx in placed if bx != (px - 7, py - 7, px + 7, py + 7)]
            if inside and not overlaps(box, own):
                placed.append(box)
                labels.append(f'<text class="point-label{" rejected" if e.status == "rejected" else ""}" '
                              f'x="{ax:.1f}" y="{ay:.1f}" text-anchor="{anchor}">{esc(label)}</text>')
                break
    parts.extend(labels)
    parts.append("</svg>")
    return _figure(plot_id, title, "".join(parts), _missing(missing, "not drawn (a number is missing)"))


def _within(core: list[float], every: list[float]) -> list[float]:
    """The values a plot's axis spans: those of the admitted models and the base, and the others
    unless they lie more than the core's own span beyond it (those are drawn at the edge, marked
    off scale, so that one broken variant does not squash the rest)."""
    lo, hi = min(core), max(core)
    span = (hi - lo) or (abs(hi) * 0.25) or 1.0
    return core + [v for v in every if lo - span <= v <= hi + span]


def _figure_empty(title: str, why: str) -> str:
    return f'<div class="plot-empty"><h4>{esc(title)}</h4>{_no_data(why)}</div>'


def _legend_pareto() -> str:
    return ('<p class="legend">'
            '<svg width="14" height="14" viewBox="-7 -7 14 14"><path class="shape base" d="M0,-6L6,0L0,6L-6,0Z"/>'
            '</svg> base '
            '<svg width="14" height="14" viewBox="-7 -7 14 14"><circle class="shape admitted" r="5"/></svg> admitted '
            '<svg width="14" height="14" viewBox="-7 -7 14 14"><circle class="shape admitted front" r="5"/></svg> '
            'admitted, on the Pareto front '
            '<svg width="22" height="10" viewBox="0 0 22 10"><path class="front" d="M1,8L11,8L11,2L21,2"/></svg> front '
            '<svg width="14" height="14" viewBox="-7 -7 14 14"><circle class="shape rejected" r="5"/>'
            '<path class="cross" d="M-3,-3L3,3M-3,3L3,-3"/></svg> rejected by a gate'
            ' · hover a point for its recipe and numbers</p>')


def _pareto_section(fam: Family) -> str:
    out = ['<section id="pareto"><h2>Trade-offs</h2>',
           '<p class="lede">Quality against measured latency and against bytes on disk, one point per model. '
           'The line joins the Pareto front: the admitted models (and the base) that no other admitted model beats '
           'on both axes at once.</p>', _legend_pareto()]
    if not fam.keys:
        out.append(_no_data("no model has a quality evaluation"))
    latency_label = LATENCY_WORDS.get(fam.latency or "", "latency")
    for key in fam.keys:
        out.append('<div class="grid2">')
        if fam.latency:
            out.append(_scatter(fam, f"pareto-latency-{key.slug()}", f"{key.label()} vs {latency_label}", key,
                                fam.latency_ms, f"{latency_label}, median (ms)"))
        else:
            out.append(_figure_empty(f"{key.label()} vs latency", "no model has a speed measurement"))
        out.append(_scatter(fam, f"pareto-bytes-{key.slug()}", f"{key.label()} vs weights on disk", key,
                            lambda e: e.bytes, "weights on disk", "bytes"))
        out.append("</div>")
    out.append("</section>")
    return "".join(out)


# --- the search: predicted and confirmed ----------------------------------------------------------

def _point_scatter(plot_id: str, title: str, points: list[tuple[dict[str, Any], float, float, str]], x_label: str,
                   y_label: str, front: list[tuple[float, float]]) -> str:
    """A plain scatter of search points: ``(point, x, y, css class)``; ``front`` is drawn through
    (x higher is better, y lower is better)."""
    if not points:
        return _figure_empty(title, "no point has both numbers")
    width, height, left, right, top, bottom = 600, 400, 74, 24, 18, 52
    xlo, xhi, xlog = domain([p[1] for p in points], include_zero=True)
    ylo, yhi, ylog = domain([p[2] for p in points], allow_log=False)
    x, y = Scale(xlo, xhi, left, width - right, xlog), Scale(ylo, yhi, height - bottom, top, ylog)
    parts = [f'<svg class="chart" role="img" aria-label="{esc(title)}" viewBox="0 0 {width} {height}" '
             f'width="{width}" height="{height}">',
             axes(x, y, x_label=x_label, y_label=y_label, x_kind="ratio", width=width, height=height)]
    if len(front) > 1:
        pts = sorted(front)
        d = "M" + "L".join(f"{x(a):.1f},{y(b):.1f}" for a, b in pts)
        parts.append(f'<path class="front" d="{d}"/>')
    for point, px, py, cls in sorted(points, key=lambda p: {"unmeasured": 0, "measured": 1, "front": 2}[p[3]]):
        m = point.get("measured") or {}
        tip = f"{point.get('label')}: x {fmt(px, 3)}, y {fmt(py, 3)}"
        if m:
            tip += f"; measured quality {fmt(m.get('quality'), 4)}, speed-up {fmt((point.get('confirmed') or m).get('speedup'), 3)}x"
        parts.append(f'<g class="search-point {cls}" data-candidate="{esc(point.get("id"))}" tabindex="0">'
                     f'<title>{esc(tip)}</title><circle class="shape {cls}" cx="{x(px):.1f}" cy="{y(py):.1f}" '
                     f'r="{6 if cls != "unmeasured" else 4}"/></g>')
        if cls == "front":
            parts.append(f'<text class="point-label" x="{x(px) + 9:.1f}" y="{y(py) + 4:.1f}">'
                         f'{esc(shorten_name(str(point.get("label")), 28))}</text>')
    parts.append("</svg>")
    return _figure(plot_id, title, "".join(parts))


def _search_section(fam: Family) -> str:
    """The last search of this family: every candidate as the proxies predicted it, and the measured
    ones as confirmed (quality drop against the dense model vs the speed-up timed beside it)."""
    if not fam.search:
        return ""
    run = fam.search[-1].get("run_id")
    points = [p for p in fam.search if p.get("run_id") == run]
    predicted, confirmed, front = [], [], []
    for p in points:
        x = p.get("proxies") or {}
        m = p.get("measured")
        cls = "front" if p.get("front") else "measured" if m else "unmeasured"
        sx, dl = number(x.get("speedup")), number(x.get("loss_delta"))
        if sx is not None and dl is not None and sx > 0:
            predicted.append((p, sx, dl, cls))
        if m:
            speed = number((p.get("confirmed") or {}).get("speedup")) or number(m.get("speedup"))
            drop = number(m.get("quality_drop"))
            if speed is not None and drop is not None and speed > 0:
                confirmed.append((p, speed, drop, cls))
                if p.get("front"):
                    front.append((speed, drop))
    measured = sum(1 for p in points if p.get("measured"))
    return ('<section id="search"><h2>Search</h2>'
            f'<p class="lede">{len(points)} candidates priced by the proxies, {measured} built and measured, '
            f'{len(front)} on the measured front. Left: what the proxies predicted (the loss increase on the '
            'calibration windows against the predicted speed-up); right: what was measured (the quality drop '
            'against the dense model by the protocol, against the speed-up timed beside it).</p>'
            '<p class="legend"><svg width="14" height="14" viewBox="-7 -7 14 14"><circle class="shape unmeasured" r="4"/>'
            '</svg> priced only <svg width="14" height="14" viewBox="-7 -7 14 14"><circle class="shape measured" r="5"/>'
            '</svg> measured <svg width="14" height="14" viewBox="-7 -7 14 14"><circle class="shape front" r="5"/>'
            '</svg> on the front</p><div class="grid2">'
            + _point_scatter("search-predicted", "predicted by the proxies", predicted, "predicted speed-up",
                             "predicted loss increase", [(a, b) for q, a, b, c in predicted if c == "front"])
            + _point_scatter("search-confirmed", "measured and confirmed", confirmed, "speed-up, timed beside the dense model",
                             "quality drop vs dense", front)
            + "</div></section>")


def _line_plot(plot_id: str, title: str, series: list[tuple[str, str, list[tuple[float, float]]]], x_label: str,
               y_label: str, x_kind: str = "", y_range: Optional[tuple[float, float]] = None) -> str:
    """Lines through points: ``(css class, legend name, [(x, y), ...])`` each, drawn in order."""
    xs = [x for _, _, pts in series for x, _ in pts]
    ys = [y for _, _, pts in series for _, y in pts]
    if not xs:
        return _figure_empty(title, "no point to draw")
    width, height, left, right, top, bottom = 600, 400, 74, 24, 18, 52
    xlo, xhi, _ = domain(xs, include_zero=True, allow_log=False)
    ylo, yhi = y_range if y_range else domain(ys, allow_log=False)[:2]
    x, y = Scale(xlo, xhi, left, width - right), Scale(ylo, yhi, height - bottom, top)
    parts = [f'<svg class="chart" role="img" aria-label="{esc(title)}" viewBox="0 0 {width} {height}" '
             f'width="{width}" height="{height}">',
             axes(x, y, x_label=x_label, y_label=y_label, x_kind=x_kind, width=width, height=height)]
    for i, (cls, name, pts) in enumerate(series):
        if not pts:
            continue
        d = "M" + "L".join(f"{x(a):.1f},{y(b):.1f}" for a, b in pts)
        parts.append(f'<g class="route-line {cls}"><title>{esc(name)}</title><path class="line {cls}" d="{d}"/>')
        if cls == "policy":
            parts += [f'<circle class="shape measured" cx="{x(a):.1f}" cy="{y(b):.1f}" r="3.5">'
                      f'<title>{esc(f"{name}: x {fmt(a, 3)}, y {fmt(b, 3)}")}</title></circle>' for a, b in pts]
        parts.append("</g>")
        parts.append(f'<text class="point-label" x="{left + 10:.1f}" y="{top + 14 + 15 * i:.1f}">'
                     f'<tspan class="key {cls}">—</tspan> {esc(name)}</text>')
    parts.append("</svg>")
    return _figure(plot_id, title, "".join(parts))


def _routing_section(fam: Family) -> str:
    """The family's last routing evaluation (``secateur route-eval``): the gap recovered against the
    share escalated (beside random routing and the hindsight bound), and against the cost."""
    if not fam.routing:
        return ""
    r = fam.routing[-1]
    curve = [c for c in r["curve"] if isinstance(c, dict) and number(c.get("escalated")) is not None
             and number(c.get("gap_recovered")) is not None]
    small, large = _dict(r.get("small")), _dict(r.get("large"))
    by_share = sorted((number(c["escalated"]), number(c["gap_recovered"])) for c in curve)
    hindsight = [(number(p[0]), number(p[1])) for p in _list(r.get("hindsight"))
                 if isinstance(p, list) and len(p) == 2 and number(p[0]) is not None and number(p[1]) is not None]
    by_cost = sorted((number(c.get("cost_vs_large")), number(c["gap_recovered"])) for c in curve
                     if number(c.get("cost_vs_large")) is not None)
    lo = min([0.0] + [b for _, b in by_share + hindsight])
    hi = max([1.0] + [b for _, b in by_share + hindsight])
    return ('<section id="routing"><h2>Routing</h2>'
            f'<p class="lede">The confidence cascade {esc(small.get("tier"))} → {esc(large.get("tier"))} on '
            f'{esc((_dict(r.get("prompts"))).get("evaluation"))} held-out prompts (thresholds fitted on the calibration '
            f'split): APGR {fmt(r.get("apgr"), 3)} on log-perplexity, where random routing gives 0.5 and the '
            f'hindsight order (no router can know it) {fmt(r.get("hindsight_apgr"), 3)}. Perplexity '
            f'{fmt(small.get("perplexity"), 4)} ({esc(small.get("tier"))}) against {fmt(large.get("perplexity"), 4)} '
            f'({esc(large.get("tier"))}); cost at 80% of the gap recovered: '
            f'{fmt_ratio(r.get("cost_at_80pct_vs_large")) if r.get("cost_at_80pct_vs_large") is not None else "not reached"}'
            ' of the large tier\'s.</p><div class="grid2">'
            + _line_plot("routing-share", "gap recovered vs share escalated",
                         [("policy", "cascade", by_share), ("random", "random routing", [(0.0, 0.0), (1.0, 1.0)]),
                          ("hindsight", "in hindsight", hindsight)],
                         "share of requests escalated", "gap recovered (log-perplexity)", y_range=(lo, hi))
            + _line_plot("routing-cost", "gap recovered vs cost",
                         [("policy", "cascade", by_cost)], "measured cost / the large tier's", "gap recovered",
                         x_kind="ratio", y_range=(lo, hi))
            + "</div></section>")


# --- early exit ---------------------------------------------------------------------------------

EXIT_METRICS = {"perplexity": False, "agreement": True}  # the exit curves' quality measures: higher is better?


def exit_curve(e: Entry) -> Optional[dict[str, Any]]:
    """The exit curve of ``e``'s last ``early_exit`` step (its card's result: ``curve``), None without one."""
    for h in reversed(_list(e.card.get("history"))):
        curve = _dict(_dict(_dict(h).get("result")).get("curve"))
        if curve.get("metric") in EXIT_METRICS and isinstance(curve.get("points"), list):
            return curve
    return None


def _blocks(e: Entry) -> Optional[int]:
    """The number of blocks of ``e``, read from its per-layer statistics (None when unknown)."""
    found = {split_layer(name)[0] for part in ("sparsity", "bits") for name in _dict(e.layers.get(part))}
    found.discard(None)
    return len(found) or None


@dataclass
class ExitLine:
    entry: Entry
    metric: str
    blocks: list[tuple[float, float, str]]    # (mean blocks, quality change %, hover text)
    speed: list[tuple[float, float, str]]     # (measured speed-up, quality change %, hover text)


def _exit_lines(fam: Family) -> list[ExitLine]:
    lines = []
    for e in fam.entries:
        curve = exit_curve(e)
        if curve is None:
            continue
        metric = curve["metric"]
        points = [p for p in curve["points"] if isinstance(p, dict) and number(p.get("mean_blocks")) is not None
                  and number(p.get(metric)) is not None]
        zero = next((number(p[metric]) for p in points if p.get("threshold") is None), None)
        if not zero:
            continue
        speeds = {number(r.get("threshold")): number(r.get("speedup")) for r in _list(e.speed.get("exit_curve"))
                  if isinstance(r, dict) and number(r.get("speedup")) is not None}
        by_blocks, by_speed = [], []
        for p in sorted(points, key=lambda p: number(p["mean_blocks"])):  # both lines follow the depth
            t = number(p.get("threshold"))
            change = 100.0 * (number(p[metric]) / zero - 1.0)
            where = "no exits" if p.get("threshold") is None else f"threshold {fmt(t, 3)}"
            tip = (f"{e.name}, {where}: {fmt(p['mean_blocks'], 3)} blocks, {metric} {fmt(p[metric], 4)} "
                   f"({fmt_pct(change)})")
            by_blocks.append((number(p["mean_blocks"]), change, tip))
            speed = 1.0 if p.get("threshold") is None and speeds else speeds.get(t)
            if speed is not None and speed > 0:
                by_speed.append((speed, change, tip + f", measured speed-up {fmt_ratio(speed)}"))
        lines.append(ExitLine(e, metric, by_blocks, by_speed))
    return lines


def _exit_plot(plot_id: str, title: str, lines: list[ExitLine], which: str,
               statics: list[tuple[Entry, float, float, str]], x_label: str, y_label: str) -> str:
    """The exit variants' curves (``which``: ``blocks`` or ``speed``) and the static variants as squares."""
    series = [(i, line, getattr(line, which)) for i, line in enumerate(lines) if getattr(line, which)]
    xs = [x for _, _, pts in series for x, _, _ in pts] + [x for _, x, _, _ in statics]
    ys = [y for _, _, pts in series for _, y, _ in pts] + [y for _, _, y, _ in statics]
    if not xs:
        return _figure_empty(title, "no curve measured")
    width, height, left, right, top, bottom = 600, 400, 74, 24, 18, 52
    xlo, xhi, _ = domain(xs, allow_log=False)
    ylo, yhi, _ = domain(ys + [0.0], allow_log=False)
    x, y = Scale(xlo, xhi, left, width - right), Scale(ylo, yhi, height - bottom, top)
    parts = [f'<svg class="chart" role="img" aria-label="{esc(title)}" viewBox="0 0 {width} {height}" '
             f'width="{width}" height="{height}">',
             axes(x, y, x_label=x_label, y_label=y_label, width=width, height=height)]
    for n, (i, line, pts) in enumerate(series):
        cls = f"exit-{i % 6}"
        d = "M" + "L".join(f"{x(a):.1f},{y(b):.1f}" for a, b, _ in pts)
        parts.append(f'<g class="exit-line" data-variant="{esc(line.entry.name)}"><title>{esc(line.entry.name)}'
                     f'</title><path class="line {cls}" d="{d}"/>')
        parts += [f'<circle class="exit-point {cls}" cx="{x(a):.1f}" cy="{y(b):.1f}" r="3.5"><title>{esc(tip)}'
                  f'</title></circle>' for a, b, tip in pts]
        parts.append("</g>")
        parts.append(f'<text class="point-label" x="{left + 10:.1f}" y="{top + 14 + 15 * n:.1f}">'
                     f'<tspan class="key {cls}">—</tspan> {esc(shorten_name(line.entry.name, 40))} (exits)</text>')
    placed: list[tuple[float, float, float, float]] = []
    labels = []
    for e, a, b, tip in statics:
        px, py = x(a), y(b)
        parts.append(f'<g class="static-point" data-variant="{esc(e.name)}"><title>{esc(tip)}</title>'
                     f'<rect class="shape {"base" if e.is_base else "admitted"}" x="{px - 5:.1f}" y="{py - 5:.1f}" '
                     f'width="10" height="10"/></g>')
        label = shorten_name(e.name, 24)
        w = text_width(label)
        lx = px + 8 if px + 8 + w <= width - 2 else px - 8 - w   # left of the square near the right edge
        box = (lx, py - 18, lx + w, py - 4)
        if not overlaps(box, placed):   # a crowded label is left to the square's hover text
            placed.append(box)
            labels.append(f'<text class="point-label" x="{lx:.1f}" y="{py - 7:.1f}">{esc(label)}</text>')
    parts += labels  # over every square
    parts.append("</svg>")
    return _figure(plot_id, title, "".join(parts))


def _exits_section(fam: Family) -> str:
    """Every variant with exit heads: the quality change its exit curve prices (on the held-out split
    of its training text, recorded by the early_exit step) against the mean blocks computed, and
    against the decode speed-up measured by the speed evaluation, beside the static variants at
    their block counts (their change on the family's perplexity evaluation against the base)."""
    lines = _exit_lines(fam)
    if not lines:
        return ""
    key = next((k for k in fam.keys if "perplexity" in (k.task, k.metric)), None)
    statics_blocks, statics_speed = [], []
    if key is not None and any(line.metric == "perplexity" for line in lines):
        exits = {line.entry.name for line in lines}
        for e in fam.entries:
            if e.name in exits:
                continue
            change = 0.0 if e.is_base else fam.delta(e, key)
            if change is None:
                continue
            tip = f"{e.name}: {key.label()} {fmt(fam.quality(e, key), 4)} ({fmt_pct(change)} vs base)"
            blocks = _blocks(e)
            if blocks is not None:
                statics_blocks.append((e, float(blocks), change, tip + f", {blocks} blocks"))
            speed = 1.0 if e.is_base else fam.speedup(e)
            if speed is not None:
                statics_speed.append((e, speed, change, tip + f", speed-up {fmt_ratio(speed)} ({LATENCY_WORDS.get(fam.latency, 'latency')})"))
    curves = [exit_curve(line.entry) for line in lines]
    data = "; ".join(f"{line.entry.name}: {c.get('data', 'data not recorded')}" for line, c in zip(lines, curves))
    metric = "perplexity" if all(line.metric == "perplexity" for line in lines) else (
        "agreement with the final embedding" if all(line.metric == "agreement" for line in lines) else "quality")
    y_label = f"{metric} change vs no exits / base, %"
    static_note = (f"Squares: the other variants of the family at their block counts, their change in {key.label()} "
                   "against the base (a different text from the curves': compare shapes, not decimals)."
                   if statics_blocks or statics_speed else
                   "No static variant with a block count and a comparable quality number to draw beside them.")
    return ('<section id="exits"><h2>Early exit</h2>'
            f'<p class="lede">Each line is a variant with exit heads: from its threshold grid (the point at the '
            f'full depth is the model without exits), the {esc(metric)} change its early_exit step priced, against '
            f'the mean blocks computed per token or input and against the decode speed-up measured by the speed '
            f'evaluation (with exits / the same loop without them; none drawn before one is measured). Priced on '
            f'{esc(data)}. {esc(static_note)}</p><div class="grid2">'
            + _exit_plot("exit-blocks", "quality vs mean blocks computed", lines, "blocks", statics_blocks,
                         "mean blocks computed", y_label)
            + _exit_plot("exit-speed", "quality vs measured speed-up", lines, "speed", statics_speed,
                         "measured speed-up vs no exits / base", y_label)
            + "</div></section>")


# --- lineage ------------------------------------------------------------------------------------

def _lineage_section(fam: Family) -> str:
    children: dict[str, list[str]] = {}
    phantoms: list[str] = []
    for v in fam.variants:
        if v.parent not in fam.by_name and v.parent not in phantoms:
            phantoms.append(v.parent)
        children.setdefault(v.parent, []).append(v.name)
    depth: dict[str, int] = {}
    slot: dict[str, float] = {}
    next_leaf = [0]
    order: list[str] = []

    def visit(name: str, d: int) -> None:
        depth[name] = d
        order.append(name)
        kids = [c for c in children.get(name, []) if c not in depth]
        for c in kids:
            visit(c, d + 1)
        if kids:
            slot[name] = (slot[kids[0]] + slot[kids[-1]]) / 2
        else:
            slot[name] = next_leaf[0]
            next_leaf[0] += 1

    for root in [fam.base.name, *phantoms]:
        if root not in depth:
            visit(root, 0)
    for v in fam.variants:  # a cycle of parents never reaches the base: draw its members as roots
        if v.name not in depth:
            visit(v.name, 0)
    longest = max((len(n) for n in depth), default=4)
    node_w = max(130, min(230, int(longest * 8) + 24))
    node_h, gap_x, gap_y, pad = 44, 140, 60, 16
    width = pad * 2 + (max(depth.values()) + 1) * node_w + max(depth.values()) * gap_x
    height = pad * 2 + max(next_leaf[0], 1) * gap_y - (gap_y - node_h)

    def pos(name: str) -> tuple[float, float]:
        return pad + depth[name] * (node_w + gap_x), pad + slot[name] * gap_y

    parts = [f'<svg class="lineage" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
             f'aria-label="lineage">']
    for v in fam.variants:
        if v.parent not in depth or depth[v.name] != depth.get(v.parent, -9) + 1:
            continue
        (px, py), (cx, cy) = pos(v.parent), pos(v.name)
        x0, y0, x1, y1 = px + node_w, py + node_h / 2, cx, cy + node_h / 2
        mid = (x0 + x1) / 2
        cls = "edge rejected" if v.status == "rejected" else "edge"
        steps = " → ".join(_step_text(s) for s in v.steps) or "(no steps recorded)"
        parts.append(f'<path class="{cls}" d="M{x0:.1f},{y0:.1f}C{mid:.1f},{y0:.1f} {mid:.1f},{y1:.1f} '
                     f'{x1:.1f},{y1:.1f}">'
                     f'<title>{esc(v.parent)} → {esc(v.name)}: {esc(steps)}</title></path>')
        parts.append(f'<text class="edge-label" x="{x1 - 6:.1f}" y="{y1 - 6:.1f}" text-anchor="end">'
                     f'{esc(shorten(_methods(v), int((gap_x - 16) / 6.2)))}</text>' if v.steps else "")
    for name in order:
        x, y = pos(name)
        e = fam.by_name.get(name)
        label = esc(shorten_name(name, int((node_w - 16) / 8)))
        if e is None:
            parts.append(f'<g class="phantom"><title>{esc(name)}: a parent that is not in this family</title>'
                         f'<rect x="{x}" y="{y}" width="{node_w}" height="{node_h}" rx="8"/>'
                         f'<text class="node-name" x="{x + 10}" y="{y + 18}">{label}</text>'
                         f'<text class="node-sub" x="{x + 10}" y="{y + 34}">not in this family</text></g>')
            continue
        sub = e.status + ("  " + " ".join("@" + a for a in e.aliases) if e.aliases else "")
        body = (f'<rect class="node {esc(e.status)}" x="{x}" y="{y}" width="{node_w}" height="{node_h}" rx="8"/>'
                f'<text class="node-name" x="{x + 10}" y="{y + 18}">{label}</text>'
                f'<text class="node-sub" x="{x + 10}" y="{y + 34}">{esc(shorten(sub, int((node_w - 16) / 6)))}</text>')
        parts.append(_mark(e, fam, body))
    parts.append("</svg>")
    return ('<section id="lineage"><h2>Lineage</h2><p class="lede">Each model and the parent it was made from; '
            'an edge is labelled with the methods of its steps (hover for the full steps). Rejected models have a '
            'dashed red outline; aliases follow the status.</p>'
            + _figure("lineage", "lineage graph", "".join(parts)) + "</section>")


# --- per-layer heatmaps -------------------------------------------------------------------------

def _heatmap(fam: Family, plot_id: str, title: str, field_name: str, colour: Callable[[Any], str],
             text: Callable[[Any], str], legend: str) -> str:
    rows = [e for e in fam.entries if _dict(e.layers.get(field_name))]
    missing = [e.name for e in fam.entries if e not in rows]
    if not rows:
        return _figure_empty(title, "no per-layer numbers (the family dict has no 'layers' entries)")
    columns = sorted({layer for e in rows for layer in e.layers[field_name]}, key=layer_order)
    label_w = min(190, max(text_width(shorten_name(e.name, 26), 11) for e in rows) + 14)
    cell_w = max(5.0, min(26.0, 760 / max(len(columns), 1)))
    cell_h, top = 20, 22
    groups = [split_layer(c)[0] for c in columns]
    xs, x = [], label_w
    for i, g in enumerate(groups):
        if i and g != groups[i - 1]:
            x += 4
        xs.append(x)
        x += cell_w
    kinds = [split_layer(c)[1] for c in columns]
    show_kinds = cell_w >= 11
    kind_h = (max(text_width(shorten(k.split(".")[-1], 14), 10) for k in kinds) + 10) if show_kinds else 8
    width = int(x + 12)
    height = int(top + len(rows) * cell_h + kind_h + 6)
    parts = [f'<svg class="heatmap" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
             f'aria-label="{esc(title)}">']
    start = 0
    for i in range(1, len(columns) + 1):  # block numbers over their groups
        if i == len(columns) or groups[i] != groups[start]:
            g = groups[start]
            mid = (xs[start] + xs[i - 1] + cell_w) / 2
            name = "other" if g is None else (f"block {g}" if xs[i - 1] - xs[start] > 40 else str(g))
            parts.append(f'<text class="block-label" x="{mid:.1f}" y="{top - 7}" text-anchor="middle">'
                         f'{esc(name)}</text>')
            start = i
    for r, e in enumerate(rows):
        y = top + r * cell_h
        values = e.layers[field_name]
        cells = [f'<text class="row-label" x="{label_w - 8}" y="{y + cell_h / 2 + 4:.1f}" text-anchor="end">'
                 f'{esc(shorten_name(e.name, 26))}</text>']
        for c, layer in enumerate(columns):
            v = values.get(layer)
            if layer not in values:
                cls, fill, what = "cell absent", "#ffffff", "not in this model"
            else:
                cls, fill, what = ("cell" if number(v) is not None else "cell none"), colour(v), text(v)
            cells.append(f'<rect class="{cls}" x="{xs[c]:.1f}" y="{y}" width="{cell_w - 1:.1f}" height="{cell_h - 1}" '
                         f'fill="{fill}"><title>{esc(e.name)} · {esc(layer)}: {esc(what)}</title></rect>')
        parts.append(_mark(e, fam, "".join(cells)))
    if show_kinds:
        y0 = top + len(rows) * cell_h + 6
        for c, kind in enumerate(kinds):
            cx = xs[c] + cell_w / 2 + 3
            parts.append(f'<text class="kind-label" transform="translate({cx:.1f} {y0}) rotate(90)">'
                         f'{esc(shorten(kind.split(".")[-1], 14))}</text>')
    parts.append("</svg>")
    note = "" if show_kinds else \
        f'<p class="missing">columns within a block: {esc(", ".join(dict.fromkeys(kinds)))}</p>'
    return _figure(plot_id, title, "".join(parts), legend + note + _missing(missing, "no per-layer numbers"))


def _sparsity_colour(v: Any) -> str:
    v = number(v)
    return NO_DATA if v is None else ramp(SPARSITY_RAMP, v)


def _bits_colour(v: Any) -> str:
    v = number(v)
    if v is None:
        return NO_DATA
    return BIT_COLOURS.get(int(v), WIDE_BITS if v >= 9 else "#3f0d12")


def _layers_section(fam: Family) -> str:
    sparsity_legend = ('<p class="legend">' + "".join(
        f'<span class="swatch" style="background:{ramp(SPARSITY_RAMP, t)}"></span>{int(t * 100)}% '
        for t in (0, 0.25, 0.5, 0.75, 1.0)) + 'zeros · grey: no data · empty: not in this model</p>')
    bits_legend = ('<p class="legend">'
                   + "".join(f'<span class="swatch" style="background:{BIT_COLOURS[b]}"></span>{b}-bit '
                             for b in (2, 3, 4, 8))
                   + f'<span class="swatch" style="background:{WIDE_BITS}"></span>16/32-bit float · '
                   'grey: no data · empty: not in this model</p>')
    return ('<section id="layers"><h2>Per layer</h2><p class="lede">One row per model, one column per weight '
            'matrix, grouped by block (hover a cell for its layer and number). Sparsity counts entries that are '
            'exactly zero once dequantized; bits is the stored width of each weight.</p><div class="stack">'
            + _heatmap(fam, "heatmap-sparsity", "sparsity per layer", "sparsity", _sparsity_colour,
                       lambda v: "no data" if number(v) is None else f"{100 * float(v):.1f}% zeros", sparsity_legend)
            + _heatmap(fam, "heatmap-bits", "bit width per layer", "bits", _bits_colour,
                       lambda v: "no data" if number(v) is None else f"{int(v)}-bit", bits_legend)
            + "</div></section>")


# --- latency distributions ----------------------------------------------------------------------

def _latency_panel(fam: Family, prefix: str, label: str, slug: str) -> str:
    rows = [e for e in fam.entries if number(e.speed.get(f"{prefix}_median")) is not None]
    missing = [e.name for e in fam.entries if e not in rows]
    label_w = min(190, max(text_width(shorten_name(e.name, 26), 11) for e in rows) + 14)
    plot_w, text_w, row_h, top, bottom = 420, 230, 26, 10, 40
    width, height = int(label_w + plot_w + text_w), top + len(rows) * row_h + bottom
    highest = max(number(e.speed.get(f"{prefix}_p99")) or number(e.speed.get(f"{prefix}_p95"))
                  or number(e.speed[f"{prefix}_median"]) for e in rows)
    xs = Scale(0.0, highest * 1.06, label_w, label_w + plot_w)
    ys = Scale(0.0, 1.0, top + len(rows) * row_h, top)
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
             f'aria-label="{esc(label)} latency">']
    parts += x_grid(xs, top, ys.start, lambda t: fmt(t, 3))
    parts.append(f'<text class="label" x="{label_w + plot_w / 2:.1f}" y="{height - 6}" text-anchor="middle">'
                 f'{esc(label)} (ms): ● p50 ┃ p95 │ p99</text>')
    base50 = number(fam.base.speed.get(f"{prefix}_median"))
    if base50 is not None:
        parts.append(f'<line class="base-line" x1="{xs(base50):.1f}" y1="{top}" x2="{xs(base50):.1f}" '
                     f'y2="{ys.start:.1f}"><title>base p50: {esc(fmt_ms(base50))}</title></line>')
    for r, e in enumerate(rows):
        y = top + r * row_h + row_h / 2
        p50 = number(e.speed[f"{prefix}_median"])
        p95, p99 = number(e.speed.get(f"{prefix}_p95")), number(e.speed.get(f"{prefix}_p99"))
        tail = p99 if p99 is not None else p95
        body = [f'<text class="row-label" x="{label_w - 8}" y="{y + 4:.1f}" text-anchor="end">'
                f'{esc(shorten_name(e.name, 26))}</text>']
        if tail is not None:
            body.append(f'<line class="whisker" x1="{xs(p50):.1f}" y1="{y}" x2="{xs(tail):.1f}" y2="{y}"/>')
        if p95 is not None:
            body.append(f'<line class="p95" x1="{xs(p95):.1f}" y1="{y - 7}" x2="{xs(p95):.1f}" y2="{y + 7}"/>')
        if p99 is not None:
            body.append(f'<line class="p99" x1="{xs(p99):.1f}" y1="{y - 5}" x2="{xs(p99):.1f}" y2="{y + 5}"/>')
        cls = "base" if e.is_base else ("rejected" if e.status == "rejected" else "admitted")
        body.append(f'<circle class="shape {cls}" cx="{xs(p50):.1f}" cy="{y}" r="5"/>')
        body.append(f'<text class="numbers" x="{label_w + plot_w + 8}" y="{y + 4:.1f}">p50 {esc(fmt(p50, 3))} · '
                    f'p95 {esc(fmt(p95, 3))} · p99 {esc(fmt(p99, 3))} ms</text>')
        parts.append(_mark(e, fam, "".join(body)))
    parts.append("</svg>")
    return _figure(f"latency-{slug}", f"{label}: distribution",
                   "".join(parts), _missing(missing, "not measured"))


def _latency_section(fam: Family) -> str:
    panels = [_latency_panel(fam, prefix, label, slug) for prefix, label, slug in LATENCIES
              if any(number(e.speed.get(f"{prefix}_median")) is not None for e in fam.entries)]
    settings = _dict(fam.base.speed.get("settings")) or next(
        (_dict(e.speed.get("settings")) for e in fam.entries if e.speed.get("settings")), {})
    how = ", ".join(f"{k} {v}" for k, v in settings.items() if isinstance(v, (str, int, float)) and v is not None)
    return ('<section id="latency"><h2>Latency</h2><p class="lede">The spread of each timing: the dot is the median '
            '(p50), the whisker runs to the 99th percentile, the ticks mark p95 and p99; the dashed line is the '
            'base\'s median. ' + (f"Measured with {esc(how)}." if how else "") + '</p>'
            + ("".join(panels) if panels else _no_data("no model has a speed measurement")) + "</section>")


# --- gates --------------------------------------------------------------------------------------

def _verdict_numbers(v: dict[str, Any]) -> str:
    value, limit, unit, kind = v.get("value"), v.get("limit"), str(v.get("unit") or ""), v.get("kind")
    if kind == "speed" or unit == "x":
        return f"{fmt(value, 3)}× (needs ≥ {fmt(limit, 3)}×)"
    if unit == "bytes" or kind in ("max_bytes", "max_peak_rss"):
        over = (number(value) or 0) - (number(limit) or 0)
        return f"{fmt_bytes(value)} (limit {fmt_bytes(limit)}" + (f", {fmt_bytes(over)} over)" if over > 0 else ")")
    if kind == "quality":
        n = number(value)
        worse = "—" if n is None else (f"{fmt(n, 3)}{unit} worse" if n > 0 else f"{fmt(-n, 3)}{unit} better")
        return f"{worse} (limit {fmt(limit, 3)}{unit})"
    return f"{fmt(value)}{unit} (limit {fmt(limit)}{unit})"


def _gates_section(fam: Family) -> str:
    rows = [e for e in fam.entries if e.verdicts or not e.is_base]
    if not any(e.verdicts for e in rows):
        return '<section id="gates"><h2>Gates</h2>' + _no_data("no gate verdicts recorded") + "</section>"
    out = ['<section id="gates"><h2>Gates</h2><p class="lede">What each model had to show to be admitted, with the '
           'measured number against the limit. A model that fails any gate is rejected and gets no alias.</p>'
           '<table class="gates"><thead><tr><th>model</th><th>status</th><th>verdicts</th></tr></thead><tbody>']
    for e in rows:
        chips = []
        for v in e.verdicts:
            ok = v.get("passed") is True
            evidence = json.dumps({k: v[k] for k in ("reference", "evidence", "variant_value") if k in v},
                                  sort_keys=True, default=str)
            chips.append(f'<span class="chip {"pass" if ok else "fail"}" title="{esc(shorten(evidence, 1200))}">'
                         f'{"✓" if ok else "✗"} {esc(v.get("gate", v.get("kind", "gate")))}: '
                         f'<b>{esc(_verdict_numbers(v))}</b></span>')
        out.append(f'<tr class="{esc(e.status)}"><td class="name">{esc(e.name)}</td>'
                   f'<td><span class="status {esc(e.status)}">{esc(e.status)}</span></td>'
                   f'<td>{"".join(chips) or "<span class=muted>no gates</span>"}</td></tr>')
    out.append("</tbody></table></section>")
    return "".join(out)


# --- summary table and cards --------------------------------------------------------------------

def _delta_cell(fam: Family, e: Entry, key: QualityKey) -> str:
    d = fam.delta(e, key)
    if e.is_base or d is None:
        return '<td class="num muted">—</td>'
    worse = d < 0 if key.higher else d > 0
    cls = "bad" if worse and abs(d) >= 0.05 else ("good" if abs(d) >= 0.05 else "")
    return f'<td class="num {cls}">{esc(fmt_pct(d))}</td>'


def _speed_class(speedup: Optional[float]) -> str:
    if speedup is None or abs(speedup - 1) < 0.005:
        return ""
    return " good" if speedup > 1 else " bad"


def _summary_section(fam: Family) -> str:
    lat_label = LATENCY_WORDS.get(fam.latency or "", "latency")
    heads = ["model", "parent", "steps", "status"]
    for key in fam.keys:
        heads += [key.label(), "Δ vs base"]
    heads += [f"{lat_label.removesuffix(' latency')} p50", "speedup", "weights", "size ×"]
    out = ['<section id="summary"><h2>Summary</h2><table class="summary"><thead><tr>'
           + "".join(f"<th>{esc(h)}</th>" for h in heads) + "</tr></thead><tbody>"]
    for e in fam.entries:
        aliases = "".join(f' <span class="alias">@{esc(a)}</span>' for a in e.aliases)
        failed = _failed(e)
        status_title = "; ".join(f"{v.get('gate')}: {_verdict_numbers(v)}" for v in failed)
        steps_title = "\n".join(_step_text(s) for s in e.steps)
        cells = [f'<td class="name">{esc(e.name)}{aliases}</td>', f'<td>{esc(e.parent or "—")}</td>',
                 f'<td title="{esc(steps_title)}">{esc(_methods(e))}</td>',
                 f'<td><span class="status {esc(e.status)}" title="{esc(status_title)}">{esc(e.status)}</span></td>']
        for key in fam.keys:
            cells.append(f'<td class="num">{esc(fmt(fam.quality(e, key)))}</td>')
            cells.append(_delta_cell(fam, e, key))
        speedup = fam.speedup(e)
        cells += [f'<td class="num">{esc(fmt_ms(fam.latency_ms(e)))}</td>',
                  f'<td class="num{_speed_class(speedup) if not e.is_base else ""}">'
                  f'{esc(fmt_ratio(speedup)) if not e.is_base else "—"}</td>',
                  f'<td class="num">{esc(fmt_bytes(e.bytes))}</td>',
                  f'<td class="num">{esc(fmt_ratio(fam.size_ratio(e))) if not e.is_base else "—"}</td>']
        out.append(f'<tr class="{esc(e.status)}">{"".join(cells)}</tr>')
    out.append("</tbody></table>")
    if fam.latency:
        out.append(f'<p class="note">Latency: the {esc(lat_label)} median; speedup is the base\'s median over '
                   'the model\'s; size × is the base\'s weight bytes over the model\'s. Δ is relative to the base; '
                   '<span class="good">green</span> is better, <span class="bad">red</span> worse.</p>')
    out.append("</section>")
    return "".join(out)


def _card_rows(fam: Family) -> list[tuple[str, Callable[[Entry], str]]]:
    def q_bits(e: Entry) -> str:
        quant = _dict(e.card.get("quantization"))
        bits = _dict(quant.get("bits"))
        return esc(", ".join(f"{n} layers at {b}-bit" for b, n in bits.items())) or "—"

    def steps(e: Entry) -> str:
        return "<br>".join(esc(_step_text(s)) for s in e.steps) or "—"

    def model(e: Entry) -> str:
        m = _dict(e.card.get("model"))
        return esc(" · ".join(str(m[k]) for k in ("model_type", "class", "dtype") if m.get(k))) or "—"

    def pct(v: Any) -> str:
        n = number(v)
        return "—" if n is None else f"{100 * n:.1f}%"

    def short_hash(v: Any) -> str:
        return f'<code title="{esc(v)}">{esc(str(v)[:12])}</code>' if isinstance(v, str) and v else "—"

    def fingerprint(f: Any) -> str:
        if not isinstance(f, dict):
            return shorten(str(f), 60)
        parts = []
        for k, v in f.items():
            v = v if isinstance(v, (str, int, float)) else json.dumps(v, sort_keys=True, default=str)
            parts.append(f"{k} {str(v)[:10] if isinstance(v, str) and re.fullmatch('[0-9a-f]{16,}', v) else v}")
        return shorten(", ".join(parts), 90)

    def fingerprints(e: Entry) -> str:
        fps = _list(e.card.get("data_fingerprints"))
        return "<br>".join(esc(fingerprint(f)) for f in fps[:4]) + (f" (+{len(fps) - 4})" if len(fps) > 4 else "") \
            if fps else "—"

    def verdicts(e: Entry) -> str:
        if not e.verdicts:
            return "—"
        return f"{len(e.verdicts) - len(_failed(e))}/{len(e.verdicts)} passed"

    s = lambda key, f=str: (lambda e: esc(f(e.summary[key])) if e.summary.get(key) is not None else "—")  # noqa: E731
    return [
        ("status", lambda e: f'<span class="status {esc(e.status)}">{esc(e.status)}</span>'),
        ("id", lambda e: short_hash(e.id)),
        ("parent", lambda e: esc(e.parent or "—")),
        ("aliases", lambda e: esc(", ".join("@" + a for a in e.aliases)) or "—"),
        ("steps", steps),
        ("model", model),
        ("base model", s("base_model")),
        ("parameters", s("parameters", lambda v: f"{int(v):,}")),
        ("sparsity", lambda e: pct(e.summary.get("sparsity"))),
        ("block sparsity", lambda e: pct(e.summary.get("block_sparsity"))),
        ("quantization", q_bits),
        ("storage", s("storage")),
        ("weights on disk", lambda e: esc(fmt_bytes(e.bytes))),
        ("all files", s("total_bytes", fmt_bytes)),
        ("compression time", s("seconds", lambda v: f"{float(v):.3g} s")),
        ("data fingerprints", fingerprints),
        ("gates", verdicts),
        ("weights sha256", lambda e: short_hash(e.card.get("weights_sha256"))),
        ("card sha256", lambda e: short_hash(e.card.get("card_sha256"))),
        ("secateur", s("secateur_version")),
        ("created", s("created")),
    ]


def _card_json(e: Entry) -> str:
    if not e.card:
        return '<span class="muted">no card</span>'
    text = json.dumps(e.card, indent=1, sort_keys=True, default=str, ensure_ascii=False)
    cut = ""
    if len(text) > CARD_JSON_LIMIT:
        cut = f"\n… cut here: {len(text) - CARD_JSON_LIMIT:,} more characters in compression.json"
        text = text[:CARD_JSON_LIMIT]
    return f"<details><summary>the card</summary><pre>{esc(text + cut)}</pre></details>"


def _cards_section(fam: Family) -> str:
    if not any(e.card for e in fam.entries):
        return '<section id="cards"><h2>Cards</h2>' + _no_data("no compression cards") + "</section>"
    out = ['<section id="cards"><h2>Cards side by side</h2><p class="lede">The compression cards '
           '(<code>compression.json</code>) of every model, one column each; open "the card" for the whole of it.</p>'
           '<div class="scroll"><table class="cards"><thead><tr><th></th>'
           + "".join(f'<th class="{esc(e.status)}">{esc(e.name)}</th>' for e in fam.entries) + "</tr></thead><tbody>"]
    for label, cell in _card_rows(fam):
        out.append(f"<tr><th>{esc(label)}</th>" + "".join(f"<td>{cell(e)}</td>" for e in fam.entries) + "</tr>")
    out.append('<tr><th>card</th>' + "".join(f"<td>{_card_json(e)}</td>" for e in fam.entries) + "</tr>")
    out.append("</tbody></table></div></section>")
    return "".join(out)


# --- the page -----------------------------------------------------------------------------------

CSS = """
:root{--ink:#1d2433;--muted:#6b7385;--line:#dde1ea;--bg:#f5f6f9;--card:#fff;--admitted:#2563eb;
--rejected:#dc2626;--base:#111827;--good:#15803d;--bad:#b91c1c;--front:#2563eb}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,
"Helvetica Neue",Arial,sans-serif}
header{background:#111827;color:#f9fafb;padding:22px 32px 16px}
header h1{margin:0 0 4px;font-size:24px;font-weight:650;letter-spacing:-.01em}
header .sub{color:#cbd2e1;font-size:13px}
header .facts{margin-top:10px;display:flex;flex-wrap:wrap;gap:6px}
header .fact{background:#1f2937;border:1px solid #374151;border-radius:999px;padding:2px 10px;font-size:12px;
color:#e5e7eb}
nav{background:#fff;border-bottom:1px solid var(--line);padding:8px 32px;
font-size:13px}
nav a{color:var(--ink);text-decoration:none;margin-right:18px}
nav a:hover{color:var(--admitted)}
main{max-width:1320px;margin:0 auto;padding:8px 24px 48px}
section{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:16px 20px;margin:18px 0}
h2{margin:0 0 6px;font-size:18px}
h4{margin:0 0 6px;font-size:14px}
.lede,.note{color:var(--muted);margin:0 0 10px;max-width:110ch}
.grid2{display:grid;grid-template-columns:repeat(auto-fit,minmax(520px,1fr));gap:14px}
.stack>*{margin-bottom:14px}
figure{margin:0;border:1px solid var(--line);border-radius:8px;padding:10px 12px;background:#fff}
figcaption{font-weight:600;margin-bottom:4px}
.scroll{overflow-x:auto}
svg.chart{max-width:100%;height:auto}
svg text{font-family:inherit}
.grid{stroke:#eef0f4}
.axis{stroke:#9aa3b5}
.tick{fill:var(--muted);font-size:11px}
.label{fill:#374151;font-size:12px}
.hint{fill:#9aa3b5;font-size:12px;font-style:italic}
.point-label{fill:#374151;font-size:11px}
.point-label.rejected{fill:var(--rejected)}
.shape.admitted{fill:#8fb3f6;stroke:#fff;stroke-width:1.5}
.shape.admitted.front{fill:var(--admitted);stroke:#1e3a8a;stroke-width:2}
.shape.rejected{fill:#fff;stroke:var(--rejected);stroke-width:1.8}
.shape.unmeasured{fill:#fff;stroke:#9ca3af;stroke-width:1.2}
.shape.measured{fill:#8fb3f6;stroke:#fff;stroke-width:1.5}
.shape.front{fill:var(--admitted);stroke:#1e3a8a;stroke-width:2}
.cross{stroke:var(--rejected);stroke-width:1.8;fill:none}
.shape.base{fill:var(--base);stroke:#fff;stroke-width:1.5}
.front{fill:none;stroke:var(--front);stroke-width:2;stroke-dasharray:5 3;opacity:.75}
.line{fill:none;stroke-width:2}
.line.policy,.key.policy{stroke:var(--admitted);fill:var(--admitted)}
.line.policy{fill:none}
.line.random,.key.random{stroke:#9aa3b5;fill:#9aa3b5}
.line.random{fill:none;stroke-dasharray:4 4}
.line.hindsight,.key.hindsight{stroke:#f59e0b;fill:#f59e0b}
.line.hindsight{fill:none;stroke-dasharray:2 3}
.line.exit-0{stroke:#7c3aed;fill:none}
.key.exit-0,.exit-point.exit-0{fill:#7c3aed}
.line.exit-1{stroke:#0d9488;fill:none}
.key.exit-1,.exit-point.exit-1{fill:#0d9488}
.line.exit-2{stroke:#ea580c;fill:none}
.key.exit-2,.exit-point.exit-2{fill:#ea580c}
.line.exit-3{stroke:#db2777;fill:none}
.key.exit-3,.exit-point.exit-3{fill:#db2777}
.line.exit-4{stroke:#65a30d;fill:none}
.key.exit-4,.exit-point.exit-4{fill:#65a30d}
.line.exit-5{stroke:#0284c7;fill:none}
.key.exit-5,.exit-point.exit-5{fill:#0284c7}
.exit-point{stroke:#fff;stroke-width:1}
.mark{cursor:default;outline:none}
.mark:hover .shape,.mark:focus .shape{stroke:#f59e0b;stroke-width:3}
.mark:hover .cell{stroke:#11182755}
.edge{fill:none;stroke:#9aa3b5;stroke-width:1.8}
.edge.rejected{stroke:#fca5a5;stroke-dasharray:4 3}
.edge-label{fill:#4b5563;font-size:11px;paint-order:stroke;stroke:#fff;stroke-width:4px}
rect.node{fill:#fff;stroke:var(--admitted);stroke-width:1.6}
rect.node.base{fill:#111827;stroke:#111827}
rect.node.rejected{fill:#fef2f2;stroke:var(--rejected);stroke-dasharray:5 3}
.mark.base .node-name,.mark.base .node-sub{fill:#f9fafb}
.node-name{font-size:12.5px;font-weight:600;fill:var(--ink)}
.node-sub{font-size:11px;fill:var(--muted)}
.mark:hover rect.node{stroke:#f59e0b;stroke-width:2.5}
.phantom rect{fill:#f9fafb;stroke:#9aa3b5;stroke-dasharray:2 3}
.phantom text{fill:var(--muted);font-size:11px}
.block-label,.kind-label{fill:var(--muted);font-size:10px}
.row-label{fill:#374151;font-size:11px}
.cell.absent{stroke:#e5e7eb;stroke-dasharray:2 2}
.break{stroke:#c4c8d0;stroke-dasharray:6 4}
.break-label{fill:#9aa3b5;font-size:10px;font-style:italic}
.whisker{stroke:#9aa3b5;stroke-width:2}
.p95{stroke:#4b5563;stroke-width:2.4}
.p99{stroke:#4b5563;stroke-width:1.4}
.base-line{stroke:#111827;stroke-dasharray:3 3;opacity:.5}
.numbers{fill:#4b5563;font-size:11px;font-variant-numeric:tabular-nums}
.legend{color:var(--muted);font-size:12px;margin:6px 0}
.legend svg{vertical-align:-2px;margin-left:8px}
.swatch{display:inline-block;width:14px;height:11px;border:1px solid #d1d5db;vertical-align:-1px;margin:0 3px 0 10px}
.missing,.nodata{color:var(--muted);font-size:12px;margin:6px 0 0}
.nodata{font-style:italic}
.plot-empty{border:1px dashed var(--line);border-radius:8px;padding:12px}
table{border-collapse:collapse;font-size:13px}
th,td{padding:5px 9px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
thead th{font-size:12px;color:var(--muted);font-weight:600;white-space:nowrap;background:#fafbfc}
table.summary{width:100%}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.name{font-weight:600;white-space:nowrap}
tr.rejected td{background:#fffafa}
.good{color:var(--good)}
.bad{color:var(--bad)}
.muted{color:var(--muted)}
.status{display:inline-block;border-radius:999px;padding:0 8px;font-size:12px;font-weight:600}
.status.admitted{background:#dbeafe;color:#1e40af}
.status.rejected{background:#fee2e2;color:#991b1b}
.status.base{background:#e5e7eb;color:#111827}
.alias{font-size:11px;color:#6d28d9;background:#ede9fe;border-radius:4px;padding:0 4px;font-weight:500}
.chip{display:inline-block;margin:2px 6px 2px 0;padding:2px 8px;border-radius:6px;font-size:12px}
.chip.pass{background:#f0fdf4;color:#166534;border:1px solid #bbf7d0}
.chip.fail{background:#fef2f2;color:#991b1b;border:1px solid #fecaca}
table.cards th:first-child{position:sticky;left:0;background:#fafbfc;white-space:nowrap}
table.cards td{min-width:130px;max-width:300px;word-break:break-word}
table.cards thead th.rejected{color:var(--rejected)}
details pre{max-height:340px;overflow:auto;background:#f8fafc;border:1px solid var(--line);padding:8px;
font-size:11px;white-space:pre-wrap}
code{font-size:12px}
footer{color:var(--muted);font-size:12px;text-align:center;margin:20px 0 30px}
"""

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def _header(fam: Family) -> str:
    base_name = _dict(fam.base.card.get("base_model")).get("name") or fam.base.summary.get("base_model") \
        or fam.base.id or fam.base.name
    admitted = sum(v.status == "admitted" for v in fam.variants)
    rejected = sum(v.status == "rejected" for v in fam.variants)
    machine = fam.machine
    facts = []
    if machine.get("cpu"):
        facts.append(f"cpu {machine['cpu']}")
    if machine.get("threads") is not None:
        facts.append(f"{machine['threads']} threads")
    facts += [f"{k} {v}" for k, v in machine.items() if k not in ("cpu", "threads")
              and isinstance(v, (str, int, float)) and not isinstance(v, bool)]
    sub = (f"base <b>{esc(base_name)}</b> · {len(fam.variants)} variants: {admitted} admitted, {rejected} rejected"
           + (f" · {esc(fam.created)}" if fam.created else ""))
    return (f'<header><h1>{esc(fam.name)}</h1><div class="sub">{sub}</div><div class="facts">'
            + "".join(f'<span class="fact">{esc(f)}</span>' for f in facts) + "</div></header>"
            '<nav><a href="#summary">Summary</a><a href="#pareto">Trade-offs</a><a href="#lineage">Lineage</a>'
            '<a href="#layers">Per layer</a><a href="#latency">Latency</a><a href="#gates">Gates</a>'
            '<a href="#cards">Cards</a></nav>')


def render(family: dict[str, Any]) -> str:
    """The report of ``family`` (the contract: :mod:`secateur.report`) as one self-contained HTML page."""
    from .._version import __version__

    fam = Family(family)
    body = "".join([_summary_section(fam), _pareto_section(fam), _search_section(fam), _routing_section(fam), _exits_section(fam),
                    _lineage_section(fam),
                    _layers_section(fam),
                    _latency_section(fam), _gates_section(fam), _cards_section(fam)])
    return ("<!DOCTYPE html>\n"
            '<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            '<link rel="icon" href="data:,">'
            f"<title>{esc(fam.name)} — secateur report</title><style>{CSS}</style></head><body>"
            + _header(fam) + f"<main>{body}</main>"
            f"<footer>secateur {esc(__version__)} · one file, no network: every plot is drawn inline</footer>"
            "</body></html>\n")


def write(family: dict[str, Any], path: str | os.PathLike) -> Path:
    """Render ``family`` and write it to ``path`` atomically (a temporary file beside it, fsynced,
    then renamed over it): a reader sees the old page or the new one, never half of one."""
    target = Path(path)
    text = render(family)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # what a plain open() would have made, not mkstemp's 0600
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return target


__all__ = ["render", "write", "pareto_front", "higher_is_better", "Family"]

"""The report's small drawing kit: escaping, number formats, linear and log scales with round
ticks, axes. Plain strings of inline SVG; no library, nothing fetched."""

from __future__ import annotations

import html
import math
from typing import Any, Iterable, Optional, Sequence


def esc(value: Any) -> str:
    """``value`` as text safe inside an element or a quoted attribute (``& < > " '`` escaped)."""
    return html.escape("" if value is None else str(value), quote=True)


def number(value: Any) -> Optional[float]:
    """A finite float, or None for anything else (None, NaN, a string, a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def fmt(value: Any, digits: int = 4) -> str:
    v = number(value)
    if v is None:
        return "—"
    if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
        return f"{v:.{max(digits - 1, 1)}e}"
    text = f"{v:.{digits}g}"
    return text


def fmt_bytes(value: Any) -> str:
    v = number(value)
    if v is None:
        return "—"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(v) >= size:
            return f"{v / size:.3g} {unit}"
    return f"{int(v)} B"


def fmt_ms(value: Any) -> str:
    v = number(value)
    return "—" if v is None else f"{v:.3g} ms"


def fmt_pct(value: Any, signed: bool = True) -> str:
    v = number(value)
    if v is None:
        return "—"
    return f"{v:+.3g}%" if signed else f"{v:.3g}%"


def fmt_ratio(value: Any) -> str:
    v = number(value)
    return "—" if v is None else f"{v:.3g}×"


# --- scales ------------------------------------------------------------------------------------

def _nice_step(span: float, count: int) -> float:
    raw = span / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * power:
            return m * power
    return 10 * power


class Scale:
    """Maps a data domain onto a pixel range; ``log`` for positive data spread over decades."""

    def __init__(self, lo: float, hi: float, start: float, end: float, log: bool = False):
        if log:
            lo, hi = math.log10(lo), math.log10(hi)
        if hi == lo:
            pad = abs(lo) * 0.1 or 1.0
            lo, hi = lo - pad, hi + pad
        self.lo, self.hi, self.start, self.end, self.log = lo, hi, start, end, log

    def __call__(self, value: float) -> float:
        v = math.log10(value) if self.log else value
        return self.start + (v - self.lo) / (self.hi - self.lo) * (self.end - self.start)

    def ticks(self, count: int = 5) -> list[float]:
        if self.log:
            first, last = math.floor(self.lo), math.ceil(self.hi)
            out = []
            for p in range(first, last + 1):
                for m in ((1, 2, 5) if last - first <= 2 else (1,)):
                    t = m * 10 ** p
                    if self.lo - 1e-9 <= math.log10(t) <= self.hi + 1e-9:
                        out.append(t)
            return out
        step = _nice_step(self.hi - self.lo, count)
        t = math.ceil(self.lo / step - 1e-9) * step
        out = []
        while t <= self.hi + step * 1e-9:
            out.append(0.0 if abs(t) < step * 1e-9 else t)
            t += step
        return out


def domain(values: Sequence[float], *, include_zero: bool = False, pad: float = 0.06,
           allow_log: bool = True) -> tuple[float, float, bool]:
    """``(lo, hi, log)`` for ``values``: a log scale when they are positive and span more than 30×,
    otherwise linear, padded, from zero when ``include_zero``."""
    lo, hi = min(values), max(values)
    if allow_log and lo > 0 and hi / lo > 30:
        return lo / 10 ** (pad * math.log10(hi / lo)), hi * 10 ** (pad * math.log10(hi / lo)), True
    if include_zero and lo >= 0:
        return 0.0, (hi * (1 + pad) if hi > 0 else 1.0), False
    span = (hi - lo) or (abs(hi) * 0.1 or 1.0)
    return lo - span * pad, hi + span * pad, False


def tick_label(value: float, kind: str = "") -> str:
    if kind == "bytes":
        return fmt_bytes(value)
    return fmt(value, 3)


def x_grid(x: Scale, top: float, bottom: float, label: Any) -> list[str]:
    """A vertical grid line from ``top`` to ``bottom`` and its tick label under it, at each of ``x``'s
    ticks; ``label(t)`` is the tick's text."""
    return [f'<line class="grid" x1="{x(t):.1f}" y1="{top:.1f}" x2="{x(t):.1f}" y2="{bottom:.1f}"/>'
            f'<text class="tick" x="{x(t):.1f}" y="{bottom + 16:.1f}" text-anchor="middle">{esc(label(t))}</text>'
            for t in x.ticks()]


def axes(x: Scale, y: Scale, *, x_label: str, y_label: str, x_kind: str = "", y_kind: str = "",
         width: float, height: float) -> str:
    """Grid lines, tick labels and axis titles of a plot whose area is ``x``'s and ``y``'s ranges."""
    left, right, bottom, top = x.start, x.end, y.start, y.end
    parts = ['<g class="axes">', *x_grid(x, top, bottom, lambda t: tick_label(t, x_kind))]
    for t in y.ticks():
        py = y(t)
        parts.append(f'<line class="grid" x1="{left:.1f}" y1="{py:.1f}" x2="{right:.1f}" y2="{py:.1f}"/>'
                     f'<text class="tick" x="{left - 6:.1f}" y="{py + 4:.1f}" text-anchor="end">'
                     f'{esc(tick_label(t, y_kind))}</text>')
    parts.append(f'<line class="axis" x1="{left:.1f}" y1="{bottom:.1f}" x2="{right:.1f}" y2="{bottom:.1f}"/>'
                 f'<line class="axis" x1="{left:.1f}" y1="{top:.1f}" x2="{left:.1f}" y2="{bottom:.1f}"/>')
    parts.append(f'<text class="label" x="{(left + right) / 2:.1f}" y="{height - 6:.1f}" text-anchor="middle">'
                 f'{esc(x_label)}{" (log scale)" if x.log else ""}</text>')
    parts.append(f'<text class="label" transform="translate(14 {(top + bottom) / 2:.1f}) rotate(-90)" '
                 f'text-anchor="middle">{esc(y_label)}{" (log scale)" if y.log else ""}</text>')
    parts.append("</g>")
    return "".join(parts)


def text_width(text: str, size: float = 11.0) -> float:
    """A rough width of ``text`` in the report's sans-serif font (for label placement)."""
    return len(text) * size * 0.58


def shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(limit - 1, 1)] + "…"


def shorten_name(text: str, limit: int) -> str:
    """A long name cut in the middle, so that both its start and its distinguishing end show."""
    if len(text) <= limit:
        return text
    head = max((limit - 1) // 2, 1)
    return text[:head] + "…" + text[len(text) - max(limit - 1 - head, 1):]


def overlaps(box: tuple[float, float, float, float], placed: Iterable[tuple[float, float, float, float]]) -> bool:
    x0, y0, x1, y1 = box
    return any(x0 < b[2] and b[0] < x1 and y0 < b[3] and b[1] < y1 for b in placed)


def mix(a: tuple[int, int, int], b: tuple[int, int, int], t: float) -> str:
    """The colour ``t`` of the way from ``a`` to ``b``, as ``#rrggbb``."""
    t = min(max(t, 0.0), 1.0)
    return "#" + "".join(f"{round(x + (y - x) * t):02x}" for x, y in zip(a, b))


def ramp(stops: Sequence[tuple[int, int, int]], t: float) -> str:
    """A colour along a piecewise-linear ramp through ``stops``, ``t`` in [0, 1]."""
    t = min(max(t, 0.0), 1.0) * (len(stops) - 1)
    i = min(int(t), len(stops) - 2)
    return mix(stops[i], stops[i + 1], t - i)


__all__ = ["esc", "number", "fmt", "fmt_bytes", "fmt_ms", "fmt_pct", "fmt_ratio", "Scale", "domain", "axes",
           "tick_label", "text_width", "shorten", "shorten_name", "overlaps", "mix", "ramp"]

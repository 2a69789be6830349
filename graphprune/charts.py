"""Inline SVG charts for the HTML report: horizontal (stacked) bars and a line chart.

Plain SVG strings, styled by the page's CSS classes (``kept``, ``removed``, ``s1``...), every label
escaped, every mark with a ``<title>`` tooltip and a ``data-value`` holding the number it draws.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

LABEL_W, BAR_W, NOTE_W = 250, 440, 200
ROW_H, GAP, TOP = 16, 5, 42  # TOP: title and legend

# A bar row: (label, one value per series, note right of the bar, tooltip).
BarRow = tuple[str, Sequence[float], str, str]
# A line: (name, css class, one value per category, "left" or "right" axis).
Line = tuple[str, str, Sequence[float], str]


def _num(x: float) -> str:
    """SVG coordinates: short, and the same text for the same number (pages are compared byte for byte)."""
    return f"{x:.2f}".rstrip("0").rstrip(".")


def _finite(x: object) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else 0.0


def _open(kind: str, title: str, width: int, height: int) -> str:
    return (f'<svg class="chart {kind}" xmlns="http://www.w3.org/2000/svg" role="img" width="{width}" '
            f'height="{height}" viewBox="0 0 {width} {height}"><title>{escape(title)}</title>'
            f'<text class="title" x="0" y="14">{escape(title)}</text>')


def _legend(series: Sequence[tuple[str, str]], x: float, y: float) -> str:
    out = []
    for name, cls in series:
        out.append(f'<rect class="{cls}" x="{_num(x)}" y="{_num(y - 9)}" width="10" height="10"/>'
                   f'<text x="{_num(x + 14)}" y="{_num(y)}">{escape(name)}</text>')
        x += 24 + 7 * len(name)
    return "".join(out)


def _mark(shape: str, cls: str, name: str, value: float, **geometry: float) -> str:
    """An SVG element of one series, carrying the value it draws (tests read it back)."""
    at = " ".join(f'{key}="{_num(v)}"' for key, v in geometry.items())
    return f'<{shape} class="{cls}" data-series="{escape(name)}" data-value="{_finite(value)!r}" {at}'


def bar_chart(title: str, rows: Sequence[BarRow], series: Sequence[tuple[str, str]], *,
              absolute: bool = False, scale_max: float | None = None, track: float | None = None) -> str:
    """Horizontal bars, one row each, the series' values stacked left to right.

    ``absolute``: bar lengths share one scale (``scale_max``, default the largest row total); otherwise
    each row fills the width (shares of its total). ``track``: a light bar from 0 to this value behind
    each row (e.g. 1.0 = the dense model).
    """
    width = LABEL_W + BAR_W + NOTE_W
    height = TOP + len(rows) * (ROW_H + GAP)
    totals = [sum(_finite(v) for v in values) for _, values, _, _ in rows]
    common = scale_max if scale_max else max([*totals, 0.0]) or 1.0
    parts = [_open("bars", title, width, height), _legend(series, LABEL_W, 34)]
    for k, ((label, values, note, tip), total) in enumerate(zip(rows, totals, strict=True)):
        y = TOP + k * (ROW_H + GAP)
        text_y = _num(y + ROW_H - 4)
        scale = common if absolute else (total or 1.0)
        parts.append(f'<g class="row"><title>{escape(tip)}</title>'
                     f'<text x="{LABEL_W - 8}" y="{text_y}" text-anchor="end">{escape(label)}</text>')
        if track is not None:
            parts.append(f'<rect class="track" x="{LABEL_W}" y="{y}" width="{_num(BAR_W * track / scale)}" '
                         f'height="{ROW_H}"/>')
        x = float(LABEL_W)
        for value, (name, cls) in zip(values, series, strict=True):
            w = BAR_W * _finite(value) / scale
            parts.append(_mark("rect", cls, name, value, x=x, y=y, width=w, height=ROW_H) + "/>")
            x += w
        parts.append(f'<text x="{LABEL_W + BAR_W + 8}" y="{text_y}">{escape(note)}</text></g>')
    return "".join(parts) + "</svg>"


def line_chart(title: str, categories: Sequence[str], series: Sequence[Line], *, left: tuple[float, str],
               right: tuple[float, str] | None = None, tips: Sequence[str] | None = None) -> str:
    """Lines over categories, points marked.

    ``left`` / ``right``: (axis maximum, "num" or "pct"); axes start at 0. ``tips``: a tooltip per
    category, on every point.
    """
    width, height = LABEL_W + BAR_W + NOTE_W, 300
    x0, x1, y0, y1 = 60.0, width - 70.0, 250.0, 50.0
    n = len(categories)
    xs = [x0 + (x1 - x0) * (i / (n - 1) if n > 1 else 0.5) for i in range(n)]
    axes = {"left": left, "right": right or left}

    def y_of(value: float, axis: str) -> float:
        top = axes[axis][0] or 1.0
        return y0 - (y0 - y1) * min(max(_finite(value) / top, 0.0), 1.05)

    parts = [_open("lines", title, width, height),
             _legend([(name, cls) for name, cls, _, _ in series], x0, 34),
             f'<line class="axis" x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}"/>']
    for side, (top, fmt) in (("left", left), *((("right", right),) if right else ())):
        x, anchor = (x0 - 6, "end") if side == "left" else (x1 + 6, "start")
        for t in range(5):
            value = top * t / 4
            y = _num(y_of(value, side))
            text = f"{100 * value:.0f}%" if fmt == "pct" else f"{value:.3g}"
            parts.append(f'<line class="axis" x1="{x0}" y1="{y}" x2="{x1}" y2="{y}"/>'
                         f'<text x="{_num(x)}" y="{_num(float(y) + 4)}" text-anchor="{anchor}">{text}</text>')
    step = max(1, math.ceil(n / 12))  # at most about 12 category labels; the rest are in the tooltips
    for i in range(0, n, step):
        parts.append(f'<text x="{_num(xs[i])}" y="{y0 + 16}" text-anchor="middle">'
                     f"{escape(categories[i])}</text>")
    for name, cls, values, axis in series:
        points = [(xs[i], y_of(v, axis)) for i, v in enumerate(values)]
        line = " ".join(f"{_num(x)},{_num(y)}" for x, y in points)
        parts.append(f'<polyline class="{cls}" points="{line}"/>')
        for i, ((x, y), value) in enumerate(zip(points, values, strict=True)):
            tip = tips[i] if tips else f"{categories[i]}: {name} {_finite(value):.4g}"
            parts.append(_mark("circle", cls, name, value, cx=x, cy=y, r=3)
                         + f"><title>{escape(tip)}</title></circle>")
    return "".join(parts) + "</svg>"

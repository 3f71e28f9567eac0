"""The report's charts as small static SVG files: histograms with threshold lines, and horizontal bars.

Why not matplotlib: the report is built at the end of every `spacetime curate`, and its 15 plots took
3.4 s there (0.9 s to import matplotlib, 1.9 s to draw with Agg), the longest part of the run's tail
once the last source was done (#12). These draw in milliseconds, are a few KB each, and stay sharp at
any zoom. The binning is numpy's (`numpy.histogram`, as `ax.hist` used); the bins are shared by every
series of a chart, so their heights compare.
"""

from __future__ import annotations

import math
from html import escape

import numpy as np

WIDTH, HEIGHT = 420, 280  # px: the size of the PNGs they replace
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b"]  # series, in order
THRESHOLD = "#d62728"
FONT = 'font-family="sans-serif"'


def ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) covering [lo, hi], about
    `count` of them."""
    span = hi - lo
    if span <= 0:
        return [lo]
    step = 10 ** math.floor(math.log10(span / count))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if span / (step * m) <= count)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _label(value: float) -> str:
    return f"{value:.4g}"


def _svg(title: str, body: list[str], height: int = HEIGHT) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
            f'viewBox="0 0 {WIDTH} {height}" {FONT} font-size="9">'
            f"<title>{escape(title)}</title>"
            f'<rect width="{WIDTH}" height="{height}" fill="white"/>'
            f'<text x="{WIDTH / 2}" y="14" text-anchor="middle" font-size="11">{escape(title)}</text>'
            + "".join(body) + "</svg>\n")


def histogram(series: dict[str, tuple[list[float], int]], title: str, lines: list[float] = (),
              bins: int = 20) -> str:
    """Overlaid step-filled histograms: `series` maps a legend label to (values, how many there were in
    all: more than len(values) where the values are a sample); `lines` are thresholds, drawn as dashed
    vertical lines. Values that are not finite are left out."""
    left, right, top, bottom = 48, WIDTH - 12, 24, HEIGHT - 30
    data = {}
    for label, (values, _) in series.items():
        a = np.asarray(values, dtype=float)
        if np.isfinite(a).any():  # a series with no finite value draws nothing
            data[label] = a[np.isfinite(a)]
    points = [float(a.min()) for a in data.values()] + [float(a.max()) for a in data.values()] + list(lines)
    lo, hi = (min(points), max(points)) if points else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    counts = {k: np.histogram(a, bins=edges)[0] for k, a in data.items()}
    peak = max((int(c.max()) for c in counts.values()), default=0) or 1
    y_ticks = [t for t in ticks(0, peak) if t == int(t)] or [0]
    y_max = max(peak, y_ticks[-1])

    def x(v: float) -> float:
        return left + (v - lo) / (hi - lo) * (right - left)

    def y(v: float) -> float:
        return bottom - v / y_max * (bottom - top)

    body = [f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#444"/>',
            f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="#444"/>']
    for t in ticks(lo, hi):
        body.append(f'<line x1="{x(t):.1f}" y1="{bottom}" x2="{x(t):.1f}" y2="{bottom + 3}" stroke="#444"/>'
                    f'<text x="{x(t):.1f}" y="{bottom + 13}" text-anchor="middle">{_label(t)}</text>')
    for t in y_ticks:
        body.append(f'<line x1="{left - 3}" y1="{y(t):.1f}" x2="{left}" y2="{y(t):.1f}" stroke="#444"/>'
                    f'<text x="{left - 5}" y="{y(t) + 3:.1f}" text-anchor="end">{int(t)}</text>')
    legend = []
    for i, (label, c) in enumerate(counts.items()):
        color = COLORS[i % len(COLORS)]
        outline = [f"{x(edges[0]):.1f},{y(0):.1f}"]
        for k, n in enumerate(c):
            outline += [f"{x(edges[k]):.1f},{y(n):.1f}", f"{x(edges[k + 1]):.1f},{y(n):.1f}"]
        outline.append(f"{x(edges[-1]):.1f},{y(0):.1f}")
        body.append(f'<polygon class="series" data-label="{escape(label)}" data-counts="{" ".join(map(str, c))}" '
                    f'points="{" ".join(outline)}" fill="{color}" fill-opacity="0.6" stroke="{color}"/>')
        legend.append((color, f"{label} ({series[label][1]})", ""))
    for v in lines:
        body.append(f'<line class="threshold" data-value="{v!r}" x1="{x(v):.1f}" y1="{top}" x2="{x(v):.1f}" '
                    f'y2="{bottom}" stroke="{THRESHOLD}" stroke-width="1.2" stroke-dasharray="4 3"/>')
        legend.append((THRESHOLD, f"threshold {v:g}", ' stroke-dasharray="4 3"'))
    for i, (color, text, dash) in enumerate(legend):
        ly = top + 8 + 12 * i
        body.append(f'<line x1="{right - 118}" y1="{ly - 3}" x2="{right - 104}" y2="{ly - 3}" stroke="{color}" '
                    f'stroke-width="4"{dash}/><text x="{right - 100}" y="{ly}" font-size="8">{escape(text)}</text>')
    return _svg(title, body)


def bars(values: dict[str, float], title: str) -> str:
    """Horizontal bars, one per name, in the given order, each labelled with its value."""
    left, right, top, row = 110, WIDTH - 48, 26, 16
    height = top + row * max(1, len(values)) + 8
    peak = max(values.values(), default=0) or 1
    body = []
    for i, (name, value) in enumerate(values.items()):
        y = top + i * row
        width = max(0.0, value) / peak * (right - left)
        body.append(f'<text x="{left - 5}" y="{y + 11}" text-anchor="end">{escape(name)}</text>'
                    f'<rect class="bar" data-name="{escape(name)}" x="{left}" y="{y + 2}" width="{width:.1f}" '
                    f'height="{row - 4}" fill="#4a7"/>'
                    f'<text x="{left + width + 4:.1f}" y="{y + 11}">{_label(value)}</text>')
    return _svg(title, body, height)

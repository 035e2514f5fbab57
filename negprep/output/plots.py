"""SVG plots of the report: histograms, count bars and the candidate funnel, inline, no scripts."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

POS, NEG, THIRD = "#2f6db5", "#d9663b", "#5a9e4b"


W, H = 660, 250
ML, MR, MT, MB = 64, 16, 30, 46  # the top margin holds the legend


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if float(v).is_integer() and abs(v) < 1e7:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    out, v = [], start
    while v <= hi + step * 1e-6:
        out.append(round(v, 12))
        v += step
    return out


class _Plot:
    """A plot area with linear axes; elements are appended as SVG strings."""

    def __init__(self, x0: float, x1: float, y1: float, xlabel: str, ylabel: str, title: str):
        self.x0, self.x1 = x0, x1 if x1 > x0 else x0 + 1
        self.y1 = y1 if y1 > 0 else 1
        self.parts: list[str] = []
        self.xlabel, self.ylabel, self.title = xlabel, ylabel, title

    def x(self, v: float) -> float:
        return ML + (v - self.x0) / (self.x1 - self.x0) * (W - ML - MR)

    def y(self, v: float) -> float:
        return H - MB - v / self.y1 * (H - MT - MB)

    def rect(self, a: float, b: float, v: float, color: str, opacity: float = 0.6, tip: str = "") -> None:
        x, y = self.x(a), self.y(v)
        w, h = max(self.x(b) - x - 0.5, 0.8), self.y(0) - y
        t = f"<title>{html.escape(tip)}</title>" if tip else ""
        self.parts.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" fill="{color}" '
            f'fill-opacity="{opacity}">{t}</rect>'
        )

    def vline(self, v: float, label: str, color: str = "#444") -> None:
        if not self.x0 <= v <= self.x1:
            return
        x = self.x(v)
        self.parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{MT}" y2="{H - MB}" stroke="{color}" stroke-dasharray="4 3"/>'
            f'<text x="{x + 4:.1f}" y="{MT + 10}" class="note">{html.escape(label)}</text>'
        )

    def svg(self, legend: Sequence[tuple[str, str]] = (), xticks: Sequence[float] | None = None) -> str:
        axes = [
            f'<line x1="{ML}" x2="{W - MR}" y1="{H - MB}" y2="{H - MB}" class="axis"/>',
            f'<line x1="{ML}" x2="{ML}" y1="{MT}" y2="{H - MB}" class="axis"/>',
        ]
        for t in xticks if xticks is not None else _ticks(self.x0, self.x1, 6):
            x = self.x(t)
            axes.append(
                f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{H - MB}" y2="{H - MB + 4}" class="axis"/>'
                f'<text x="{x:.1f}" y="{H - MB + 16}" text-anchor="middle">{_fmt(t)}</text>'
            )
        grid = []
        for t in _ticks(0, self.y1, 4):
            y = self.y(t)
            grid.append(f'<line x1="{ML}" x2="{W - MR}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
            axes.append(f'<text x="{ML - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
        axes.append(f'<text x="{(ML + W - MR) / 2}" y="{H - 8}" text-anchor="middle">{html.escape(self.xlabel)}</text>')
        axes.append(
            f'<text transform="translate(14 {(MT + H - MB) / 2}) rotate(-90)" text-anchor="middle">'
            f"{html.escape(self.ylabel)}</text>"
        )
        leg, x = [], ML
        for label, color in legend:  # one row above the plot area, left to right
            leg.append(
                f'<rect x="{x}" y="8" width="11" height="11" fill="{color}" fill-opacity="0.7"/>'
                f'<text x="{x + 16}" y="18">{html.escape(label)}</text>'
            )
            x += 16 + 6.2 * len(label) + 18
        body = "".join(grid + self.parts + axes + leg)  # grid under the bars, axes and labels over them
        return (
            f'<svg class="plot" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" '
            f'aria-label="{html.escape(self.title)}">{body}</svg>'
        )


def hist_svg(h: dict, series: Sequence[tuple[str, str, str]], xlabel: str, title: str, vlines=()) -> str:
    """Overlaid histograms on shared edges; `series` = (key in h, legend label, colour)."""
    edges = h["edges"]
    present = [s for s in series if s[0] in h]
    top = max((max(h[k]) if h[k] else 0) for k, _, _ in present) if present else 1
    p = _Plot(edges[0], edges[-1], top * 1.08, xlabel, "count (sample)", title)
    for key, label, color in present:
        for a, b, c in zip(edges[:-1], edges[1:], h[key], strict=True):
            if c:
                p.rect(a, b, c, color, 0.55, f"{label} {_fmt(a)}..{_fmt(b)}: {c:,}")
    for v, label in vlines:
        p.vline(v, label)
    legend = [(f"{label} (n={h.get('sampled', {}).get(key, sum(h[key])):,})", color) for key, label, color in present]
    return p.svg(legend)


def counts_svg(counts: Sequence[int], xlabel: str, ylabel: str, title: str, color: str = POS) -> str:
    """Bars for exact counts indexed by an integer value 0..len-1."""
    n = max(len(counts), 1)
    p = _Plot(-0.5, n - 0.5, max(counts, default=0) * 1.08, xlabel, ylabel, title)
    for i, c in enumerate(counts):
        if c:
            p.rect(i - 0.4, i + 0.4, c, color, 0.75, f"{i}: {c:,}")
    step = max(1, math.ceil(n / 12))
    return p.svg(xticks=list(range(0, n, step)))


def funnel_svg(stages: Sequence[tuple[str, int, str]], title: str) -> str:
    """Horizontal bars, one per (label, value, colour), labelled with their values."""
    row, left, width = 26, 230, W - 230 - 90
    top = max((v for _, v, _ in stages), default=0) or 1
    parts = []
    for i, (label, v, color) in enumerate(stages):
        y = 8 + i * row
        w = max(v / top * width, 1 if v else 0)
        parts.append(
            f'<text x="{left - 8}" y="{y + 15}" text-anchor="end">{html.escape(label)}</text>'
            f'<rect x="{left}" y="{y + 3}" width="{w:.1f}" height="{row - 8}" fill="{color}" fill-opacity="0.75">'
            f"<title>{html.escape(label)}: {v:,}</title></rect>"
            f'<text x="{left + w + 6:.1f}" y="{y + 15}">{v:,}</text>'
        )
    h = 16 + row * len(stages)
    return (
        f'<svg class="plot" viewBox="0 0 {W} {h}" width="{W}" height="{h}" role="img" '
        f'aria-label="{html.escape(title)}">{"".join(parts)}</svg>'
    )

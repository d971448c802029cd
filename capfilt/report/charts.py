"""Inline SVG charts for the run report: line charts (loss curves, threshold sweeps) and stacked
histograms (ITM scores). Plain strings, no JS and no external files, so the page stays
self-contained. Every label goes through ``html.escape``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

PALETTE = ("#1f6fb4", "#e8801a", "#2e9d5b", "#c23b3b", "#7b52ab", "#8c564b", "#d062a8", "#6b6b6b")

MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 58, 16, 34, 46
"""Plot-area margins in px: room for y tick labels, the legend row and the x axis label."""


@dataclass
class Series:
    """One line of a line chart; points with a non-finite x or y are skipped."""

    name: str
    xs: Sequence[float]
    ys: Sequence[float]
    color: str | None = None
    width: float = 1.6
    dashed: bool = False


def _finite(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def nice_ticks(lo: float, hi: float, target: int = 5, integer: bool = False) -> list[float]:
    """About ``target`` round tick values (steps of 1, 2 or 5 × 10^k) covering [lo, hi];
    ``integer`` keeps the step at 1 or more (training steps, counts)."""
    if not (_finite(lo) and _finite(hi)):
        return []
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    if integer:
        step = max(step, 1.0)
    start = math.floor(lo / step + 1e-9) * step
    end = math.ceil(hi / step - 1e-9) * step
    n = max(1, round((end - start) / step))
    return [round(start + i * step, 12) for i in range(n + 1)]


def fmt_tick(value: float, step: float) -> str:
    """A tick label with as many decimals as the step needs; large values get k/M suffixes."""
    if abs(value) >= 1e6 and step >= 1e5:
        return f"{value / 1e6:g}M"
    if abs(value) >= 1e4 and step >= 1e3:
        return f"{value / 1e3:g}k"
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) if step > 0 else 0
    return f"{value:.{decimals}f}"


class _Frame:
    """Maps data coordinates to the SVG plot area and draws axes, ticks, grid and labels."""

    def __init__(self, width: int, height: int, xticks: list[float], yticks: list[float]):
        self.width, self.height = width, height
        self.x0, self.x1 = MARGIN_LEFT, width - MARGIN_RIGHT
        self.y0, self.y1 = height - MARGIN_BOTTOM, MARGIN_TOP  # y0 is the bottom of the plot
        self.xticks, self.yticks = xticks, yticks
        self.xlo, self.xhi = xticks[0], xticks[-1]
        self.ylo, self.yhi = yticks[0], yticks[-1]

    def x(self, v: float) -> float:
        span = (self.xhi - self.xlo) or 1.0
        return self.x0 + (v - self.xlo) / span * (self.x1 - self.x0)

    def y(self, v: float) -> float:
        span = (self.yhi - self.ylo) or 1.0
        return self.y0 - (v - self.ylo) / span * (self.y0 - self.y1)

    def axes(self, x_label: str, y_label: str, x_tick_labels: bool = True) -> list[str]:
        parts = []
        ystep = self.yticks[1] - self.yticks[0] if len(self.yticks) > 1 else 1.0
        xstep = self.xticks[1] - self.xticks[0] if len(self.xticks) > 1 else 1.0
        for t in self.yticks:
            y = self.y(t)
            parts.append(
                f'<line class="grid" x1="{self.x0}" y1="{y:.1f}" x2="{self.x1}" y2="{y:.1f}"/>'
            )
            parts.append(
                f'<text class="tick" x="{self.x0 - 6}" y="{y + 4:.1f}" text-anchor="end">{escape(fmt_tick(t, ystep))}</text>'
            )
        for t in self.xticks:
            x = self.x(t)
            parts.append(
                f'<line class="axis" x1="{x:.1f}" y1="{self.y0}" x2="{x:.1f}" y2="{self.y0 + 5}"/>'
            )
            if x_tick_labels:
                parts.append(
                    f'<text class="tick" x="{x:.1f}" y="{self.y0 + 18}" text-anchor="middle">{escape(fmt_tick(t, xstep))}</text>'
                )
        parts.append(
            f'<line class="axis" x1="{self.x0}" y1="{self.y0}" x2="{self.x1}" y2="{self.y0}"/>'
        )
        parts.append(
            f'<line class="axis" x1="{self.x0}" y1="{self.y0}" x2="{self.x0}" y2="{self.y1}"/>'
        )
        parts.append(
            f'<text class="label" x="{(self.x0 + self.x1) / 2:.1f}" y="{self.height - 8}" text-anchor="middle">{escape(x_label)}</text>'
        )
        cy = (self.y0 + self.y1) / 2
        parts.append(
            f'<text class="label" x="14" y="{cy:.1f}" text-anchor="middle" transform="rotate(-90 14 {cy:.1f})">{escape(y_label)}</text>'
        )
        return parts


def _legend(items: list[tuple[str, str, bool]], width: int) -> list[str]:
    """A legend row above the plot: (name, colour, is_box) items laid out left to right."""
    parts, x = [], MARGIN_LEFT
    for name, color, box in items:
        if box:
            parts.append(f'<rect x="{x}" y="9" width="12" height="12" fill="{color}"/>')
        else:
            parts.append(
                f'<line x1="{x}" y1="15" x2="{x + 16}" y2="15" stroke="{color}" stroke-width="2.5"/>'
            )
        parts.append(f'<text class="legend" x="{x + 20}" y="19">{escape(name)}</text>')
        x += 28 + 7 * len(name)
        if x > width - 60:
            break
    return parts


def _svg(width: int, height: int, title: str, body: list[str], css_class: str) -> str:
    return (
        f'<svg class="{css_class}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}"><title>{escape(title)}</title>'
        + "".join(body)
        + "</svg>"
    )


def empty_chart(message: str, width: int = 560, height: int = 120) -> str:
    body = [
        f'<rect x="0.5" y="0.5" width="{width - 1}" height="{height - 1}" class="empty"/>',
        f'<text class="label" x="{width / 2}" y="{height / 2 + 4}" text-anchor="middle">{escape(message)}</text>',
    ]
    return _svg(width, height, message, body, "chart empty-chart")


def line_chart(
    series: Sequence[Series],
    *,
    title: str,
    x_label: str,
    y_label: str,
    width: int = 560,
    height: int = 300,
    x_range: tuple[float, float] | None = None,
    y_range: tuple[float, float] | None = None,
    vlines: Sequence[tuple[float, str]] = (),
    x_integer: bool = False,
) -> str:
    """An SVG line chart of ``series`` with ticked axes, a legend and optional labelled vertical lines."""
    clean = []
    for i, s in enumerate(series):
        pts = [
            (float(x), float(y))
            for x, y in zip(s.xs, s.ys, strict=False)
            if _finite(x) and _finite(y)
        ]
        if pts:
            clean.append((s, s.color or PALETTE[i % len(PALETTE)], pts))
    if not clean:
        return empty_chart(f"{title}: no data points", width)
    xs = [p[0] for _, _, pts in clean for p in pts]
    ys = [p[1] for _, _, pts in clean for p in pts]
    xlo, xhi = x_range or (min(xs), max(xs))
    ylo, yhi = y_range or (min(ys), max(ys))
    if y_range is None and 0 <= ylo < 0.25 * yhi:
        ylo = 0.0  # start at zero when the data nearly reach it anyway: easier to read
    frame = _Frame(width, height, nice_ticks(xlo, xhi, 6, x_integer), nice_ticks(ylo, yhi, 5))
    body = frame.axes(x_label, y_label)
    for x, label in vlines:
        if _finite(x) and frame.xlo <= x <= frame.xhi:
            px = frame.x(x)
            body.append(
                f'<line class="marker" x1="{px:.1f}" y1="{frame.y0}" x2="{px:.1f}" y2="{frame.y1}"/>'
            )
            body.append(
                f'<text class="marker-label" x="{px + 4:.1f}" y="{frame.y1 + 12}">{escape(label)}</text>'
            )
    for s, color, pts in clean:
        dash = ' stroke-dasharray="5 3"' if s.dashed else ""
        if len(pts) == 1:
            x, y = pts[0]
            body.append(
                f'<circle cx="{frame.x(x):.1f}" cy="{frame.y(y):.1f}" r="3" fill="{color}"/>'
            )
            continue
        d = " ".join(
            f"{'M' if j == 0 else 'L'}{frame.x(x):.1f},{frame.y(y):.1f}"
            for j, (x, y) in enumerate(pts)
        )
        body.append(
            f'<path d="{d}" fill="none" stroke="{color}" stroke-width="{s.width}"{dash}><title>{escape(s.name)}</title></path>'
        )
    body += _legend([(s.name, color, False) for s, color, _ in clean], width)
    return _svg(width, height, title, body, "chart line-chart")


def histogram_chart(
    edges: Sequence[float],
    stacks: Sequence[tuple[str, Sequence[int], str]],
    *,
    title: str,
    x_label: str = "ITM match score",
    y_label: str = "texts",
    threshold: float | None = None,
    width: int = 340,  # three histograms side by side in the 1200 px page
    height: int = 250,
) -> str:
    """Stacked bars over the bins ``edges`` (len = bins + 1); ``stacks`` are (name, counts, colour),
    drawn bottom to top; a dashed line marks ``threshold``."""
    n_bins = len(edges) - 1
    if n_bins < 1 or not stacks:
        return empty_chart(f"{title}: no data", width)
    totals = [sum(int(s[1][i]) for s in stacks if i < len(s[1])) for i in range(n_bins)]
    if sum(totals) == 0:
        return empty_chart(f"{title}: no texts", width)
    yticks = nice_ticks(0, max(totals) * 1.12, 5)  # headroom above the bars for the threshold label
    frame = _Frame(width, height, nice_ticks(edges[0], edges[-1], 5), yticks)
    body = frame.axes(x_label, y_label)
    for i in range(n_bins):
        left, right = frame.x(edges[i]), frame.x(edges[i + 1])
        base = 0
        for name, counts, color in stacks:
            c = int(counts[i]) if i < len(counts) else 0
            if c <= 0:
                continue
            top, bottom = frame.y(base + c), frame.y(base)
            body.append(
                f'<rect x="{left + 0.5:.1f}" y="{top:.1f}" width="{max(right - left - 1, 0.5):.1f}" '
                f'height="{bottom - top:.1f}" fill="{color}"><title>{escape(name)}: {c} '
                f"(score {edges[i]:.2f}–{edges[i + 1]:.2f})</title></rect>"
            )
            base += c
    if threshold is not None and _finite(threshold) and edges[0] <= threshold <= edges[-1]:
        px = frame.x(threshold)
        body.append(
            f'<line class="marker" x1="{px:.1f}" y1="{frame.y0}" x2="{px:.1f}" y2="{frame.y1}"/>'
        )
        anchor, dx = ("end", -4) if threshold > (edges[0] + edges[-1]) / 2 else ("start", 4)
        body.append(
            f'<text class="marker-label" x="{px + dx:.1f}" y="{frame.y1 + 12}" text-anchor="{anchor}">threshold {threshold:g}</text>'
        )
    legend = [(name, color, True) for name, _, color in stacks]
    if threshold is not None:
        legend.append(("threshold", "#333", False))
    body += _legend(legend, width)
    return _svg(width, height, title, body, "chart histogram")

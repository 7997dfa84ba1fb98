"""Inline SVG charts for report.html: horizontal bars, line charts, histograms.

No plotting library and no scripts: each function returns one ``<svg>``
element as text. Every label passes through :func:`esc`, so a catalog value
(a title, a reason detail) can never become markup.
"""
from __future__ import annotations

import html
import math
from typing import Sequence

PALETTE = ("#3b6ea8", "#e07b39", "#4a9a5b", "#b5487a", "#7b68b5", "#8c8c3a", "#3a9a9a", "#a05a2c")
FONT = 'font-family="system-ui,sans-serif" font-size="11"'


def esc(value) -> str:
    """HTML-escape any value for text or a quoted attribute."""
    return html.escape("" if value is None else str(value), quote=True)


def fmt(value: float) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 10:
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def fmt_bytes(value) -> str:
    if value is None:
        return ""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return ""


def bar_chart(rows: Sequence[tuple[str, Sequence[float]]], series: Sequence[str] = ("",), width: int = 560,
              unit: str = "", colors: Sequence[str] = PALETTE, label_width: int = 150, title: str = "") -> str:
    """Horizontal bars: one group per row label, one bar per series value (values >= 0)."""
    if not rows:
        return "<p class='muted'>(nothing to chart)</p>"
    bar_h, gap = 14, 8
    group_h = bar_h * len(series) + gap
    legend_h = 18 if len(series) > 1 else 0
    height = legend_h + len(rows) * group_h + 6
    top = max((v for _, values in rows for v in values if v is not None), default=0) or 1
    plot_w = width - label_width - 70
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" {FONT} role="img" '
             f'aria-label="{esc(title)}">']
    if legend_h:
        x = label_width
        for s, color in zip(series, colors):
            parts.append(f'<rect x="{x}" y="3" width="10" height="10" fill="{color}"/>'
                         f'<text x="{x + 14}" y="12">{esc(s)}</text>')
            x += 14 + 7 * len(s) + 16
    for g, (label, values) in enumerate(rows):
        y0 = legend_h + g * group_h
        parts.append(f'<text x="{label_width - 6}" y="{y0 + group_h / 2 + 1:.1f}" text-anchor="end" '
                     f'dominant-baseline="middle">{esc(label)}</text>')
        for i, (value, color) in enumerate(zip(values, colors)):
            y = y0 + i * bar_h
            w = 0 if value is None else max(value / top * plot_w, 1 if value > 0 else 0)
            parts.append(f'<rect x="{label_width}" y="{y}" width="{w:.1f}" height="{bar_h - 2}" fill="{color}">'
                         f'<title>{esc(label)}{": " + esc(series[i]) if series[i] else ""} {esc(fmt(value))}{esc(unit)}'
                         f'</title></rect><text x="{label_width + w + 4:.1f}" y="{y + bar_h - 4}">'
                         f'{esc(fmt(value))}{"" if value is None else esc(unit)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def histogram_chart(edges: Sequence[float], counts: Sequence[int], width: int = 560, height: int = 200,
                    x_label: str = "", color: str = PALETTE[0], marker: float | None = None,
                    marker_label: str = "") -> str:
    """Vertical bars over ``len(counts)`` bins with the given edges (a count above each non-empty bar)."""
    if not counts:
        return "<p class='muted'>(nothing to chart)</p>"
    left, right, top, bottom = 40, 16, 16, 36
    plot_w, plot_h = width - left - right, height - top - bottom
    lo, hi, peak = edges[0], edges[-1], max(max(counts), 1)

    def px(x: float) -> float:
        return left + (x - lo) / ((hi - lo) or 1) * plot_w

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" {FONT} role="img" '
             f'aria-label="{esc(x_label)}">',
             f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#888"/>']
    for a, b, n in zip(edges, edges[1:], counts):
        h = n / peak * plot_h
        parts.append(f'<rect x="{px(a) + 1:.1f}" y="{top + plot_h - h:.1f}" width="{max(px(b) - px(a) - 2, 1):.1f}" '
                     f'height="{h:.1f}" fill="{color}"><title>{esc(fmt(a))} to {esc(fmt(b))}: {n}</title></rect>')
        if n:
            parts.append(f'<text x="{(px(a) + px(b)) / 2:.1f}" y="{top + plot_h - h - 3:.1f}" '
                         f'text-anchor="middle">{n}</text>')
    ticks = edges if len(edges) <= 11 else edges[:: max(1, len(edges) // 10)]
    for e in ticks:
        parts.append(f'<text x="{px(e):.1f}" y="{top + plot_h + 14}" text-anchor="middle">{e:g}</text>')
    if marker is not None and lo <= marker <= hi:
        parts.append(f'<line x1="{px(marker):.1f}" x2="{px(marker):.1f}" y1="{top}" y2="{top + plot_h}" '
                     f'stroke="#c0392b" stroke-dasharray="4 3"/><text x="{px(marker) - 4:.1f}" y="{top + 10}" '
                     f'text-anchor="end" fill="#c0392b">{esc(marker_label)}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 4}" text-anchor="middle">{esc(x_label)}</text></svg>')
    return "".join(parts)


def line_chart(series: Sequence[dict], width: int = 560, height: int = 260, x_label: str = "", y_label: str = "",
               log_x: bool = True, y_range: tuple[float, float] = (0.0, 1.0), target: float | None = None) -> str:
    """Lines over shared axes. Each series: {"name", "points": [(x, y, x_text)], "marked": index or None,
    "color"}. A marked point gets a ring (the chosen setting); ``target`` draws a dashed horizontal line."""
    points = [p for s in series for p in s["points"]]
    if not points:
        return "<p class='muted'>(no points measured)</p>"
    left, right, top, bottom = 46, 16, 14, 40

    def tx(x: float) -> float:
        return math.log2(x) if log_x and x > 0 else x

    xs = [tx(p[0]) for p in points]
    x_lo, x_hi = min(xs), max(xs)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    y_lo, y_hi = y_range
    y_lo = min(y_lo, min(p[1] for p in points))
    plot_w, plot_h = width - left - right, height - top - bottom

    pad = 36  # keeps the first and last setting's label inside the frame

    def px(x: float) -> float:
        return left + pad + (tx(x) - x_lo) / (x_hi - x_lo) * (plot_w - 2 * pad)

    def py(y: float) -> float:
        return top + (1 - (y - y_lo) / ((y_hi - y_lo) or 1)) * plot_h

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" {FONT} role="img" '
             f'aria-label="{esc(y_label)} against {esc(x_label)}">',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#bbb"/>']
    for i in range(5):
        y = y_lo + (y_hi - y_lo) * i / 4
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#eee"/>'
                     f'<text x="{left - 5}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.2f}</text>')
    seen_x = {}
    for p in points:
        seen_x.setdefault(round(px(p[0])), p[2])
    for x, text in sorted(seen_x.items()):
        parts.append(f'<text x="{x}" y="{top + plot_h + 14}" text-anchor="middle">{esc(text)}</text>')
    if target is not None:
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{py(target):.1f}" y2="{py(target):.1f}" '
                     f'stroke="#c0392b" stroke-dasharray="5 3"/><text x="{left + plot_w - 4}" y="{py(target) - 4:.1f}" '
                     f'text-anchor="end" fill="#c0392b">target {target:g}</text>')
    for n, s in enumerate(series):
        color = s.get("color") or PALETTE[n % len(PALETTE)]
        coords = [(px(x), py(y)) for x, y, _ in s["points"]]
        dash = ' stroke-dasharray="3 3"' if s.get("dashed") else ""
        parts.append(f'<polyline points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in coords)}" fill="none" '
                     f'stroke="{color}" stroke-width="2"{dash}/>')
        for (a, b), (_x, y, text) in zip(coords, s["points"]):
            parts.append(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{color}"><title>{esc(s["name"])} '
                         f'{esc(text)}: {y:.4f}</title></circle>')
        if s.get("marked") is not None:
            a, b = coords[s["marked"]]
            parts.append(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="8" fill="none" stroke="#c0392b" stroke-width="2"/>'
                         f'<text x="{a:.1f}" y="{b + 20:.1f}" text-anchor="middle" fill="#c0392b">chosen</text>')
    legend_x = left + 8
    for n, s in enumerate(series):
        color = s.get("color") or PALETTE[n % len(PALETTE)]
        parts.append(f'<rect x="{legend_x}" y="{top + plot_h - 14 - 14 * n}" width="10" height="3" fill="{color}"/>'
                     f'<text x="{legend_x + 14}" y="{top + plot_h - 10 - 14 * n}">{esc(s["name"])}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle">{esc(x_label)}</text>'
                 f'<text x="12" y="{top + plot_h / 2}" transform="rotate(-90 12 {top + plot_h / 2})" '
                 f'text-anchor="middle">{esc(y_label)}</text></svg>')
    return "".join(parts)

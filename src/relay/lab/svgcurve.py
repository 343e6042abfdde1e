"""The threshold curve as inline SVG for the HTML report (no script, no external files).

Drawn from the report JSON's ``curve`` only. A curve has at most curves.MAX_POINTS
points, so the SVG stays a few kilobytes however large the corpus: one polyline, one
band polygon, one marker.
"""

from __future__ import annotations

from collections.abc import Mapping
from html import escape
from typing import Any

WIDTH, HEIGHT = 380, 300
LEFT, RIGHT, TOP, BOTTOM = 48, 12, 12, 40
PLOT_W, PLOT_H = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM


def _xy(ham: float, spam: float) -> str:
    return f"{LEFT + ham * PLOT_W:.1f},{TOP + (1 - spam) * PLOT_H:.1f}"


def _rate(p: Mapping[str, Any]) -> float:
    return float(p["rate"] or 0.0)


def _axes() -> list[str]:
    out = [
        f"<rect x='{LEFT}' y='{TOP}' width='{PLOT_W}' height='{PLOT_H}' fill='none' stroke='#999'/>"
    ]
    for i in range(5):
        f = i / 4
        x, y = LEFT + f * PLOT_W, TOP + (1 - f) * PLOT_H
        out.append(
            f"<line x1='{x:.1f}' y1='{TOP}' x2='{x:.1f}' y2='{TOP + PLOT_H}' stroke='#eee'/>"
            f"<line x1='{LEFT}' y1='{y:.1f}' x2='{LEFT + PLOT_W}' y2='{y:.1f}' stroke='#eee'/>"
            f"<text x='{x:.1f}' y='{TOP + PLOT_H + 14}' font-size='10' "
            f"text-anchor='middle'>{i * 25}%</text>"
            f"<text x='{LEFT - 4}' y='{y + 3:.1f}' font-size='10' "
            f"text-anchor='end'>{i * 25}%</text>"
        )
    out.append(
        f"<text x='{LEFT + PLOT_W / 2:.1f}' y='{HEIGHT - 6}' font-size='11' "
        "text-anchor='middle'>legitimate mail blocked</text>"
        f"<text x='12' y='{TOP + PLOT_H / 2:.1f}' font-size='11' text-anchor='middle' "
        f"transform='rotate(-90 12 {TOP + PLOT_H / 2:.1f})'>spam stopped</text>"
    )
    return out


def _threshold(t: float | None) -> str:
    return "above every score (forced actions only)" if t is None else f"score >= {t:g}"


def curve_svg(name: str, curve: Mapping[str, Any]) -> str:
    """The curve with its 95% band shaded and the operating point marked."""
    points = curve["points"]
    # The curve rises in both shares as the cutoff falls, so the band's upper-left edge
    # joins the optimistic ends of both intervals and its lower-right edge the others.
    upper = [_xy(p["ham"]["low"], p["spam"]["high"]) for p in points]
    lower = [_xy(p["ham"]["high"], p["spam"]["low"]) for p in reversed(points)]
    line = " ".join(_xy(_rate(p["ham"]), _rate(p["spam"])) for p in points)
    op = curve["operating"]
    first = points[0]
    label = escape(name)
    return "\n".join(
        [
            f"<svg xmlns='http://www.w3.org/2000/svg' width='{WIDTH}' height='{HEIGHT}' "
            f"viewBox='0 0 {WIDTH} {HEIGHT}' role='img' class='curve' "
            f"aria-label='{label}: spam stopped against legitimate mail blocked'>",
            *_axes(),
            f"<polygon points='{' '.join(upper + lower)}' fill='#9ecae1' fill-opacity='0.45' "
            "stroke='none'><title>95% Wilson band (pointwise)</title></polygon>",
            f"<polyline points='{line}' fill='none' stroke='#1f4e79' stroke-width='1.6'/>",
            f"<rect x='{LEFT + _rate(first['ham']) * PLOT_W - 3:.1f}' "
            f"y='{TOP + (1 - _rate(first['spam'])) * PLOT_H - 3:.1f}' width='6' height='6' "
            "fill='#555'><title>forced actions only: "
            f"{100 * _rate(first['spam']):.1f}% spam, {100 * _rate(first['ham']):.1f}% "
            "legitimate</title></rect>",
            f"<circle cx='{LEFT + _rate(op['ham']) * PLOT_W:.1f}' "
            f"cy='{TOP + (1 - _rate(op['spam'])) * PLOT_H:.1f}' r='5' fill='#d62728' "
            f"stroke='black'><title>operating point ({escape(_threshold(op['threshold']))}): "
            f"{100 * _rate(op['spam']):.1f}% spam stopped, {100 * _rate(op['ham']):.1f}% "
            "legitimate mail blocked</title></circle>",
            "</svg>",
        ]
    )

"""The report's two pictures, drawn from the report JSON only (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a display

import matplotlib.pyplot as plt
from matplotlib.lines import Line2D

TIER_COLOURS = {
    "none": "#9e9e9e",
    "T0": "#1a9850",
    "T1": "#91cf60",
    "T2": "#fdae61",
    "T3": "#d73027",
}


def _pct(p: Mapping[str, Any]) -> tuple[float, float, float]:
    rate = p["rate"] or 0.0
    return 100 * rate, 100 * (rate - p["low"]), 100 * (p["high"] - rate)


def _label_offsets(points: list[tuple[float, float]]) -> list[float]:
    """Vertical label offsets (points) so that labels of nearby regimes do not overlap."""
    offsets: list[float] = []
    for i, (x, y) in enumerate(points):
        near = [j for j in range(i) if abs(points[j][0] - x) < 8 and abs(points[j][1] - y) < 6]
        offsets.append(6.0 - 12.0 * len(near))
    return offsets


def tradeoff(report: Mapping[str, Any], path: Path) -> None:
    """Spam stopped against legitimate mail blocked; colour = highest tier, size = T3 share."""
    fig, ax = plt.subplots(figsize=(8, 6), dpi=110)
    regimes = list(report["regimes"])
    points = [(_pct(r["ham_blocked"])[0], _pct(r["spam_stopped"])[0]) for r in regimes]
    offsets = _label_offsets(points)
    # Big (content-reading) markers first, so smaller ones stay visible on top.
    order = sorted(range(len(regimes)), key=lambda i: -(regimes[i]["content_read"]["rate"] or 0))
    for z, i in enumerate(order):
        r = regimes[i]
        x, xl, xh = _pct(r["ham_blocked"])
        y, yl, yh = _pct(r["spam_stopped"])
        yh_hard = _pct(r["spam_stopped_hard"])[0]
        colour = TIER_COLOURS[r["highest_tier"]]
        size = 50 + 350 * (r["content_read"]["rate"] or 0.0)
        ax.errorbar(
            x,
            y,
            xerr=[[xl], [xh]],
            yerr=[[yl], [yh]],
            fmt="none",
            ecolor="#555555",
            elinewidth=0.8,
            capsize=3,
            zorder=1,
        )
        ax.scatter(
            [x], [y], s=size, c=colour, edgecolors="black", linewidths=0.8, alpha=0.85, zorder=2 + z
        )
        ax.scatter([x], [yh_hard], s=40, marker="x", c="black", zorder=20)
        ax.annotate(
            r["name"],
            (x, y),
            textcoords="offset points",
            xytext=(10, offsets[i]),
            fontsize=9,
            zorder=30,
        )
    ax.set_xlabel("legitimate mail blocked (%)  [reject, tempfail, quarantine]")
    ax.set_ylabel("spam stopped (%)  [circle: hard + soft, x: hard only]")
    ax.set_title("What each regime stops and what it costs (95% Wilson intervals)")
    ax.set_ylim(-3, 103)
    ax.set_xlim(-3, max(25.0, max((p[0] for p in points), default=0.0) + 12))
    ax.grid(True, alpha=0.3)
    handles = [
        Line2D(
            [],
            [],
            marker="o",
            linestyle="",
            markerfacecolor=c,
            markeredgecolor="black",
            markersize=9,
            label=f"highest tier {t}",
        )
        for t, c in TIER_COLOURS.items()
        if t != "none"
    ]
    handles.append(
        Line2D(
            [],
            [],
            marker="o",
            linestyle="",
            markerfacecolor="white",
            markeredgecolor="black",
            markersize=14,
            label="bigger = more mail read (T3)",
        )
    )
    ax.legend(handles=handles, loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def tiers(report: Mapping[str, Any], path: Path) -> None:
    """Share of messages decided at each tier, one bar per regime."""
    regimes = report["regimes"]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.6 * max(1, len(regimes))), dpi=110)
    names = [r["name"] for r in regimes]
    left = [0.0] * len(regimes)
    for tier, colour in TIER_COLOURS.items():
        widths = [100 * (r["tiers"][tier]["rate"] or 0.0) for r in regimes]
        ax.barh(names, widths, left=left, color=colour, edgecolor="white", label=tier)
        for i, w in enumerate(widths):
            if w >= 6:
                ax.text(left[i] + w / 2, i, f"{w:.0f}%", ha="center", va="center", fontsize=8)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.set_xlim(0, 100)
    ax.invert_yaxis()
    ax.set_xlabel("messages decided at each privacy tier (%)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), title="tier")
    ax.set_title("How much of each message a regime had to read")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def draw(report: Mapping[str, Any], directory: Path) -> dict[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    out = {"tradeoff": directory / "tradeoff.png", "tiers": directory / "tiers.png"}
    if report["regimes"]:
        tradeoff(report, out["tradeoff"])
        tiers(report, out["tiers"])
    return {k: f"{directory.name}/{v.name}" for k, v in out.items()}

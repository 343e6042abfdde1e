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


def tradeoff(report: Mapping[str, Any], path: Path) -> None:
    """Spam stopped against legitimate mail blocked; colour = highest tier, size = T3 share."""
    fig, ax = plt.subplots(figsize=(8, 6), dpi=110)
    for r in report["regimes"]:
        x, xl, xh = _pct(r["ham_blocked"])
        y, yl, yh = _pct(r["spam_stopped"])
        yh_hard = _pct(r["spam_stopped_hard"])[0]
        colour = TIER_COLOURS[r["highest_tier"]]
        size = 60 + 540 * (r["content_read"]["rate"] or 0.0)
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
        ax.scatter([x], [y], s=size, c=colour, edgecolors="black", linewidths=0.8, zorder=2)
        ax.scatter([x], [yh_hard], s=40, marker="x", c="black", zorder=3)
        ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(8, 6), fontsize=9)
    ax.set_xlabel("legitimate mail blocked (%)  [reject, tempfail, quarantine]")
    ax.set_ylabel("spam stopped (%)  [circle: hard + soft, x: hard only]")
    ax.set_title("What each regime stops and what it costs (95% Wilson intervals)")
    ax.set_ylim(-3, 103)
    ax.set_xlim(left=-3)
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
    ax.legend(handles=handles, loc="lower right", fontsize=8)
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

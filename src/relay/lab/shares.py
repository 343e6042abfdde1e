"""A share with its 95% Wilson interval, in the form every lab report number takes."""

from __future__ import annotations

from typing import Any

from relay.intervals import wilson


def proportion(k: int, n: int) -> dict[str, Any]:
    low, high = wilson(k, n)
    return {
        "k": k,
        "n": n,
        "rate": None if n == 0 else round(k / n, 6),
        "low": round(low, 6),
        "high": round(high, 6),
    }

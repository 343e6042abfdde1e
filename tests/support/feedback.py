"""Feedback entries for store tests: a fixed time and a minimal entry per number."""

from __future__ import annotations

from relay.feedback.record import Domains, FeedbackEntry

NOW = 1_795_000_000.0  # a fixed report time (2026-11-18): tests never read the clock


def entry(n: int, label: str = "spam", reporter: str = "r1", at: float = NOW) -> FeedbackEntry:
    return FeedbackEntry(
        digest=f"{n:064x}",
        label="spam" if label == "spam" else "ham",
        source="cli",
        reporter=reporter,
        at=at,
        feature_version=2,
        vector=b"\x00\x00\x00\x00",
        domains=Domains("", (), ()),
    )

"""bench.learning: with --as-stamped each message gets the relay's own Authentication-Results
(the real stamp) from the trusted upstream field, so a report of it credits the sender;
the cost of the 90 % target under any cut (``fpr_at_recall``)."""

from __future__ import annotations

import asyncio

import numpy as np
from bench.learning import Mail, fpr_at_recall, stamp_all

from relay.facts import default_registry
from relay.feedback.reputation import Identity, identities
from relay.lab.offline_auth import HeaderAuth, offline_registry

OURS = "relay.test.invalid"
RAW = (
    b"Authentication-Results: relay.test.invalid; dkim=pass header.d=forged.example\r\n"
    b"Authentication-Results: upstream.example; dkim=pass header.d=shop.example "
    b"header.s=s1 header.a=rsa-sha256\r\n"
    b"From: a@shop.example\r\nTo: u@example.com\r\nSubject: hi\r\n"
    b"Date: Mon, 1 Dec 2025 10:00:00 +0000\r\n\r\nhello\r\n"
)


def test_stamped_copy_carries_our_field_with_the_trusted_results() -> None:
    registry = offline_registry(default_registry(), HeaderAuth(frozenset({"upstream.example"})))
    mail = Mail("m", "spam", RAW, 1764583200.0, "site:shop.example")
    (stamped,) = asyncio.run(stamp_all([mail], registry, OURS))
    assert stamped.raw == RAW  # the classifier still scores the copy as received
    assert stamped.delivered.startswith(b"Authentication-Results: relay.test.invalid;")
    assert b"forged.example" not in stamped.delivered  # the stamp drops fields claiming us
    credited = identities(stamped.delivered, (), OURS)
    assert credited == (Identity("sender", "shop.example"),)
    assert identities(RAW, (), OURS) == (Identity("sender", "forged.example"),)


def test_fpr_at_recall_counts_the_ham_above_the_cut_that_stops_that_much_spam() -> None:
    # 10 spam, 5 ham: stopping 9 spam needs the cut at 0.2, which flags the ham at 0.3
    # and 0.2 (ties count as flagged); stopping all 10 needs 0.05, flagging 4 of 5.
    spam = np.array([True] * 10 + [False] * 5)
    scores = np.array([0.9] * 8 + [0.2, 0.05] + [0.3, 0.2, 0.1, 0.06, 0.01])
    assert fpr_at_recall(spam, scores, 0.9)["k"] == 2
    assert fpr_at_recall(spam, scores, 0.8)["k"] == 0
    assert fpr_at_recall(spam, scores, 1.0)["k"] == 4
    assert fpr_at_recall(spam, scores, 0.9)["n"] == 5

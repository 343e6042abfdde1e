"""What a downstream's answer becomes in our reply to the client.

A transport's ``send`` answers only after the downstream answered (or the Maildir file is
fsynced and renamed into new/):

- downstream 2xx            -> our 250
- downstream 5xx            -> our 5xx (its code and enhanced status)
- downstream 4xx, refused
  connection, drop, timeout -> our 451 4.4.x, so the sender retries and nothing is lost
"""

from __future__ import annotations

from relay.errors import DeliveryError, PermanentDeliveryError, TemporaryDeliveryError


def status_of(text: str, code: int) -> tuple[str, str]:
    """Split an enhanced status code off a reply text, or make one from the basic code."""
    head, _, rest = text.strip().partition(" ")
    parts = head.split(".")
    if len(parts) == 3 and all(p.isdigit() for p in parts) and parts[0] == str(code // 100):
        return head, rest
    return f"{code // 100}.0.0", text.strip()


def downstream_failure(code: int, text: str) -> DeliveryError:
    """Map a downstream non-2xx answer to the error we answer our client with."""
    status, rest = status_of(text, code)
    if 500 <= code < 600:
        return PermanentDeliveryError(code, status, f"Downstream refused: {rest}"[:400])
    return TemporaryDeliveryError(451, "4.4.0", "Downstream deferred, try again later")

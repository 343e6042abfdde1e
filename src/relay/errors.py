"""One error tree for the whole relay.

    RelayError
    ├── ConfigError            bad configuration file: file, key and reason
    ├── PolicyError            a policy file failed validation (holds every problem found)
    ├── ModelError             model file missing, corrupt, untrusted or version-mismatched
    ├── FactError              a fact could not be computed (the policy treats it as missing)
    ├── MessageTimeError       a stored message has no usable date and none was given
    ├── StateError             the shared-state backend failed
    ├── DeliveryError          the downstream did not take the message
    │   ├── TemporaryDeliveryError   4xx, refused connection, drop, timeout -> our 451
    │   └── PermanentDeliveryError   5xx from the downstream -> our 5xx
    └── QuarantineError        quarantine store problems (unknown id, unreadable entry)

Every error carries a message fit for an operator's log: never a message body or a secret.
"""

from __future__ import annotations


class RelayError(Exception):
    """Base of every error the relay raises on purpose."""


class ConfigError(RelayError):
    """A configuration file is unreadable or invalid."""

    def __init__(self, path: str, key: str, reason: str) -> None:
        self.path = path
        self.key = key
        self.reason = reason
        super().__init__(f"{path}: {key}: {reason}" if key else f"{path}: {reason}")


class PolicyError(RelayError):
    """A policy file is invalid; ``problems`` lists every error with file, line and rule."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class ModelError(RelayError):
    """The classifier model cannot be used."""


class FactError(RelayError):
    """A fact's computation failed; the message flows on without it."""


class MessageTimeError(RelayError):
    """A stored message carries no usable date (Received, Date) and the caller gave none."""


class StateError(RelayError):
    """The shared-state backend failed."""


class QuarantineError(RelayError):
    """The quarantine store could not do what was asked."""


class DeliveryError(RelayError):
    """The downstream did not take the message; ``code`` and ``text`` are what we answer."""

    def __init__(self, code: int, status: str, text: str) -> None:
        self.code = code
        self.status = status
        self.text = text
        super().__init__(f"{code} {status} {text}")


class TemporaryDeliveryError(DeliveryError):
    """The sender should retry (we answer 451)."""


class PermanentDeliveryError(DeliveryError):
    """The downstream refused for good (we answer its 5xx)."""

"""One error tree for the whole relay.

    RelayError
    ├── ConfigError            bad configuration file: file, key and reason; also a policy
    │                          that reads a fact whose service is off (assembly.check_services)
    ├── PolicyError            a policy file failed validation (holds every problem found)
    ├── ModelError             model file missing, corrupt, untrusted or version-mismatched
    ├── FactError              a fact could not be computed (the policy treats it as missing)
    │   └── DnsTemporaryError        dns.py: SERVFAIL, timeout (the check says temperror)
    ├── MessageTimeError       a stored message has no usable date and none was given
    ├── CorpusError            a labels file, message source or corpus member is unreadable
    ├── ShardContractError     lab/shards.py: a state-backed fact touched a key its family
    │                          did not declare (the sharded pass 2 stops, nothing cached)
    ├── StateError             the shared-state backend failed
    ├── TagListError           auth/tagvalue.py: a DKIM/DMARC tag list that does not parse
    │                          (the scan fetches no key, the record is ignored)
    ├── FeedbackRefused        feedback/: a report was refused (unparsable, too big, capped)
    ├── DeliveryError          the downstream did not take the message
    │   ├── TemporaryDeliveryError   4xx, refused connection, drop, timeout -> our 451
    │   └── PermanentDeliveryError   5xx from the downstream -> our 5xx
    ├── QuarantineError        quarantine store problems (unknown id, unreadable entry)
    ├── WorkerFailure          a child process (proc/pipes.py) did not answer a request
    │   ├── WorkerDied               it exited first (callers retry once on its replacement)
    │   ├── WorkerError              its handler failed on this request
    │   ├── WorkerTimeout            no answer within the caller's limit; it was killed
    │   ├── WorkerBusy               the pool already holds max_pending requests: refused
    │   │                            at once, so overload defers mail instead of queueing
    │   └── ConditionTimeout         proc/celsandbox.py: a message's policy conditions
    │                                gave no result in time (the message is deferred)
    ├── BadRequest             ops/http.py: a malformed HTTP request to /metrics, /readyz
    ├── MilterProtocolError    milter/wire.py: a packet that breaks the milter protocol
    │                          (the session is closed, the process goes on)
    ├── BodyHashMismatch       auth/sigcrypto.py: a DKIM body hash differs; also a dkimpy
    │                          ValidationError, so dkimpy's own handling still applies
    └── _TooSlow               auth/scan.py (private): a From field too long to parse on
                               the event loop

Module-private errors stay beside the code that raises and catches them; everything
else is defined here. One class is deliberately outside the tree: ``auth/spf.py``'s
``_NeedAnswer`` is a BaseException used for control flow through pyspf (no ``except
Exception`` on the way may mistake it for a failure), never an error.
``tests/test_errors.py`` fails on any exception class in ``src/relay`` outside the tree.

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


class CorpusError(RelayError):
    """A labels file, message source or corpus member is unreadable or malformed."""


class StateError(RelayError):
    """The shared-state backend failed."""


class FeedbackRefused(RelayError):
    """A feedback report was refused and nothing was learned; ``reason`` is a short
    fixed word for the metric label (unparsable, too_large, reporter_cap, ...)."""

    def __init__(self, reason: str, text: str) -> None:
        super().__init__(text)
        self.reason = reason


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


class WorkerFailure(RelayError):
    """A child process fed over pipes (proc/pipes.py) did not answer a request."""


class WorkerDied(WorkerFailure):
    """The child process serving the request exited before answering."""


class WorkerError(WorkerFailure):
    """The child's handler failed on this request (the child itself lives on)."""


class WorkerTimeout(WorkerFailure):
    """The child took longer than the caller's limit; it was killed (and is replaced), and
    the other requests it held fail with WorkerDied."""


class WorkerBusy(WorkerFailure):
    """The pool already holds ``max_pending`` requests: this one is refused at once, so
    an overloaded relay defers mail (4xx) instead of queueing it without bound."""


class ConditionTimeout(WorkerFailure):
    """The policy conditions run in the sandbox child (proc/celsandbox.py) gave no result
    within the message's time limit, or the child died twice; the message is deferred."""

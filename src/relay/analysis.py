"""The analysis child: one process per relay worker that classifies and verifies.

With the classifier and child-process verification both on (the default configuration),
each relay worker runs ``python -m relay.analysis PARENT_PID MODEL_PATH`` children
(``max([model] workers, [auth] workers)`` of them) instead of a classifier child and a
verification child: one interpreter instead of two saved ~50 MiB over a 2-worker process
tree and one process wake-up a message (issue 17). ``assembly.open_classifier`` starts it
through ``serving.Classifier``; the worker's ``Authenticator`` is handed the same pool
(``Authenticator.share``).

Requests, told apart by their first byte (parsed, never unpickled):

- ``VERIFY`` (``V``) + a verification request (``auth/wire.py``) -> its answer;
- anything else: a classifier request (``C``, ``B``, ``I``: ``relay.classifier.child``).

The verification code (dkimpy, cryptography) is imported at start, after the model has
loaded (so the loading peak does not hold it too), so the first message pays for neither;
not when this module is imported (the relay worker imports it for ``MODULE``), and without
dkimpy's resolver (``cryptoproc.load_offline``). Its own unit above ``auth`` and
``classifier``, which may not import each other (tests/test_layers.py).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from relay.auth.wire import VERIFY
from relay.classifier.child import Served, start
from relay.proc.pipes import serve

MODULE = "relay.analysis"


def verify(payload: bytes) -> bytes:
    """One verification request (without its op byte), answered by auth/cryptoproc.py.
    Imported here, not at the top: a relay worker imports this module (for ``MODULE``) and
    must not load dkimpy and cryptography with it (~8 MiB); ``main`` loads them at start."""
    from relay.auth import cryptoproc

    return cryptoproc.handle(payload)


@dataclass(frozen=True, slots=True)
class Analysis:
    """The model this child serves, and verification beside it."""

    served: Served

    def handle(self, payload: bytes) -> bytes:
        if payload[:1] == VERIFY:
            return verify(payload[1:])
        return self.served.handle(payload)

    def handle_many(self, payloads: list[bytes]) -> list[bytes]:
        """The classifier's requests of one read in one prediction call; each verification
        on its own (should one raise, ``serve`` answers every request alone)."""
        others = [p for p in payloads if p[:1] != VERIFY]
        answers = iter(self.served.handle_many(others) if others else [])
        return [verify(p[1:]) if p[:1] == VERIFY else next(answers) for p in payloads]


def main(argv: list[str]) -> int:
    served = start(argv, MODULE)
    if served is None:
        return 2
    from relay.auth.cryptoproc import load_offline

    load_offline()  # the verifier loads now, not at the first message
    analysis = Analysis(served)
    return serve(analysis.handle, analysis.handle_many)


if __name__ == "__main__":
    sys.exit(main(sys.argv))

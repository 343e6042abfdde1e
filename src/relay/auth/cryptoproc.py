"""The DKIM/ARC verification child process (``[auth] workers`` > 0).

Started by the relay as ``python -m relay.auth.cryptoproc PARENT_PID`` through
``relay.proc.pipes.PipeWorkers`` when the classifier is off (with it on, one
``relay.analysis`` child per relay worker verifies and classifies, its verification
requests prefixed with ``VERIFY``); it runs ``verify_message`` on each request and answers
with the results. The request and answer formats are ``auth/wire.py``'s, which the relay
worker imports instead of this module, so that only the children load dkimpy and
cryptography.
"""

from __future__ import annotations

import sys
from types import ModuleType

from relay.auth.wire import VERIFY, decode_answer, decode_request, encode_answer, encode_request
from relay.proc.pipes import serve

# The codec's names stay importable from here too (the child's tests speak through them).
__all__ = ["VERIFY", "decode_answer", "encode_request", "handle", "load_offline"]

DNSPLUG = "dkim.dnsplug"  # dkimpy's resolver module, imported by ``dkim/__init__``


def handle(payload: bytes) -> bytes:
    """One request in, one answer out (runs in the child)."""
    from relay.auth.verify import verify_message  # loaded at start by ``load_offline``

    return encode_answer(*verify_message(*decode_request(payload)))


def _refuse_lookup(name: bytes, timeout: float = 5) -> bytes:
    raise RuntimeError("a verification child never resolves: keys are looked up beforehand")


def load_offline() -> None:
    """Import the verifier, with dkimpy's own resolver replaced by one that refuses: a
    child start's first step. Keys reach the child with each request (``verify.py`` hands
    dkimpy a ``dnsfunc`` reading them), so dkimpy's default lookup must never run, and its
    module would load dnspython for nothing (3.5 MiB of RSS a child, issue 17). A no-op
    when dkimpy is loaded already (a test process)."""
    if "dkim" not in sys.modules and DNSPLUG not in sys.modules:
        stub = ModuleType(DNSPLUG, "dkimpy's resolver, replaced: this process never resolves")
        stub.get_txt = _refuse_lookup  # type: ignore[attr-defined]
        sys.modules[DNSPLUG] = stub
    import relay.auth.verify  # noqa: F401 - now, not at the first message


if __name__ == "__main__":
    load_offline()
    sys.exit(serve(handle))

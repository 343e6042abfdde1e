"""The DKIM/ARC verification child process (``[auth] workers`` > 0), and the request
codec the shared analysis child (``relay.analysis``) speaks too.

Started by the relay as ``python -m relay.auth.cryptoproc PARENT_PID`` through
``relay.proc.pipes.PipeWorkers`` when the classifier is off (with it on, one
``relay.analysis`` child per relay worker verifies and classifies, its verification
requests prefixed with ``VERIFY``); it runs ``verify_message`` on each request and answers
with the results. Requests and answers are parsed, never unpickled:

- request: a JSON line ``{"limit": N, "arc": bool, "keys": [[name, record], ...]}``
  (key names and records as Latin-1 text, so any byte survives), then the raw message;
- answer: JSON ``{"dkim": DkimResults.to_dict(), "arc": ArcResult.to_dict()}``.
"""

from __future__ import annotations

import json
import sys

from relay.auth.results import ArcResult, DkimResults
from relay.auth.verify import KeyRecords, verify_message
from relay.proc.pipes import serve

# The op byte that marks a verification request in a child that also classifies (the
# classifier's ops are C, B and I: relay/classifier/child.py).
VERIFY = b"V"


def encode_request(raw: bytes, keys: KeyRecords, limit: int, arc: bool) -> tuple[bytes, bytes]:
    """(JSON line, raw message): sent as two pieces, so the message is never copied."""
    pairs = [
        [name.decode("latin-1"), None if record is None else record.decode("latin-1")]
        for name, record in keys.items()
    ]
    head = json.dumps({"limit": limit, "arc": arc, "keys": pairs}).encode()
    return head + b"\n", raw


def handle(payload: bytes) -> bytes:
    """One request in, one answer out (runs in the child)."""
    head, _, raw = payload.partition(b"\n")
    request = json.loads(head)
    keys = {
        name.encode("latin-1"): None if record is None else record.encode("latin-1")
        for name, record in request["keys"]
    }
    limit, arc = int(request["limit"]), bool(request["arc"])
    dkim_results, arc_result = verify_message(raw, keys, limit, arc)
    return json.dumps({"dkim": dkim_results.to_dict(), "arc": arc_result.to_dict()}).encode()


def decode_answer(payload: bytes) -> tuple[DkimResults, ArcResult]:
    answer = json.loads(payload)
    return DkimResults.from_dict(answer["dkim"]), ArcResult.from_dict(answer["arc"])


if __name__ == "__main__":
    sys.exit(serve(handle))

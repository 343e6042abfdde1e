"""The verification request and answer as bytes: what a relay worker needs to have
signatures verified in a child, without importing the verifier.

A worker that verifies in children (``[auth] workers`` > 0, the default) only encodes
requests and decodes answers; dkimpy, PyNaCl and cryptography (~8 MiB of RSS a worker,
issue 17) are imported by the children (``auth/cryptoproc.py``, ``analysis.py``) and, with
``workers = 0``, by the worker itself (``auth/verify.py``). Parsed, never unpickled:

- request: a JSON line ``{"limit": N, "arc": bool, "keys": [[name, record], ...]}``
  (key names and records as Latin-1 text, so any byte survives), then the raw message;
- answer: JSON ``{"dkim": DkimResults.to_dict(), "arc": ArcResult.to_dict()}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from relay.auth.results import ArcResult, DkimResults

# The op byte that marks a verification request in a child that also classifies (the
# classifier's ops are C, B and I: relay/classifier/child.py).
VERIFY = b"V"

# A key record looked up ahead: the TXT value, None (no record) or TEMPERROR.
TEMPERROR = b"\x00temperror"
KeyRecords = Mapping[bytes, bytes | None]


def encode_request(raw: bytes, keys: KeyRecords, limit: int, arc: bool) -> tuple[bytes, bytes]:
    """(JSON line, raw message): sent as two pieces, so the message is never copied."""
    pairs = [
        [name.decode("latin-1"), None if record is None else record.decode("latin-1")]
        for name, record in keys.items()
    ]
    head = json.dumps({"limit": limit, "arc": arc, "keys": pairs}).encode()
    return head + b"\n", raw


def decode_request(payload: bytes) -> tuple[bytes, dict[bytes, bytes | None], int, bool]:
    """(raw message, key records, limit, arc) of one request (in the child)."""
    head, _, raw = payload.partition(b"\n")
    request = json.loads(head)
    keys = {
        name.encode("latin-1"): None if record is None else record.encode("latin-1")
        for name, record in request["keys"]
    }
    return raw, keys, int(request["limit"]), bool(request["arc"])


def encode_answer(dkim_results: DkimResults, arc_result: ArcResult) -> bytes:
    return json.dumps({"dkim": dkim_results.to_dict(), "arc": arc_result.to_dict()}).encode()


def decode_answer(payload: bytes) -> tuple[DkimResults, ArcResult]:
    answer = json.loads(payload)
    return DkimResults.from_dict(answer["dkim"]), ArcResult.from_dict(answer["arc"])

"""The verification child's codec: what crosses the pipe gives exactly the results
``verify_message`` gives in-process."""

from __future__ import annotations

from relay.auth.cryptoproc import decode_answer, encode_request, handle
from relay.auth.verify import TEMPERROR, verify_message
from tests.support.dkimkeys import ed25519_key, make_message, rsa_key, sign


def test_round_trip_equals_in_process_results() -> None:
    rsa = rsa_key("example.com", "r1", 1024)
    ed = ed25519_key("example.net", "ed")
    late = rsa_key("slow.example", "s", 1024)
    raw = sign(sign(sign(make_message(body="Caf\xe9 \u2603\r\n"), rsa), ed), late)
    keys: dict[bytes, bytes | None] = {
        rsa.name.encode(): rsa.txt.encode(),
        ed.name.encode(): None,  # no record
        late.name.encode(): TEMPERROR,  # a NUL byte must survive the JSON header
    }
    for arc in (False, True):
        expected = verify_message(raw, keys, 10, arc)
        got = decode_answer(handle(b"".join(encode_request(raw, keys, 10, arc))))
        assert got == expected
    assert [s.result for s in expected[0].signatures] == ["temperror", "permerror", "pass"]

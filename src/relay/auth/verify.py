"""DKIM and ARC verification with dkimpy: synchronous, CPU-bound, never touches the network.

``verify_message`` runs in a child process (``auth/cryptoproc.py``, ``analysis.py``) or,
with ``[auth] workers = 0``, in a thread of the relay worker, the only case in which a
worker imports this module (and dkimpy, cryptography). Its key records were fetched by the
async resolver beforehand; the ``dnsfunc`` handed to dkimpy only reads that mapping, so a
signature whose key was not prefetched simply has no key.

What dkimpy does not give and is wrapped here:
- ``dkim.verify()`` answers only True/False for the first signature. We run its steps
  per signature (``parse_tag_value``, ``validate_signature_fields``, ``evaluate_pk``,
  ``select_headers``) so each gets a result word (pass/fail/temperror/permerror) and a
  reason. The message is split once for all signatures and only the signed fields are
  canonicalised (auth/dkimparse.py, same bytes as dkimpy); the signature maths runs in
  OpenSSL (auth/sigcrypto.py), as dkimpy's own RSA is pure Python.
- revoked keys (empty p=), key-type vs a= mismatch and the key's h= hash list are
  checked here before the signature maths.
- rsa-sha1 verifies (RFC 8301 calls it historic): reported as ``weak``.
"""

from __future__ import annotations

import binascii
import logging
import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import dkim
from dkim.util import parse_tag_value

from relay.auth.dkimparse import split_message
from relay.auth.headerscan import MAX_ARC_INSTANCES, MAX_SIGNATURE_FIELD, key_name
from relay.auth.results import ArcResult, DkimResults, DkimSignatureResult
from relay.auth.sigcrypto import KEY_CACHE_SIZE, load_key, verify_signature
from relay.auth.wire import TEMPERROR as TEMPERROR
from relay.auth.wire import KeyRecords as KeyRecords  # the worker's light half (re-exported)
from relay.message import Fields

MIN_KEY_BITS = 1024  # RFC 8301 3.2: smaller RSA keys MUST NOT be considered valid

_HAS_SIGNATURE = re.compile(rb"^dkim-signature[ \t]*:", re.IGNORECASE | re.MULTILINE)
_H_SEPARATOR = re.compile(rb"\s*:\s*")  # between h= names, as dkimpy splits them

_quiet = logging.getLogger("relay.auth.dkimpy")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False  # dkimpy logs every failure at error level, with header text


def _text(value: bytes | None) -> str:
    return "" if value is None else value.decode("ascii", "replace")


def _reason(exc: BaseException) -> str:
    text = str(exc)
    # dkimpy quotes the offending value (b= blobs, whole keys): keep facts and headers short.
    return text if len(text) <= 120 else text[:117] + "..."


def _int_tag(tags: Mapping[bytes, bytes], name: bytes) -> int | None:
    value = tags.get(name)
    return int(value) if value is not None and value.isdigit() and len(value) < 20 else None


def _describe(
    index: int, tags: Mapping[bytes, bytes], result: str, reason: str, **more: Any
) -> DkimSignatureResult:
    """The result of one signature: its verdict and what its tags say about it."""
    return DkimSignatureResult(
        index=index,
        result=result,
        reason=reason,
        domain=_text(tags.get(b"d")).lower(),
        selector=_text(tags.get(b"s")),
        algorithm=_text(tags.get(b"a")).lower(),
        canonicalization=_text(tags.get(b"c", b"simple/simple")).lower(),
        identity=_text(tags.get(b"i")),
        headers=tuple(h.strip().lower() for h in _text(tags.get(b"h")).split(":") if h.strip()),
        body_length=_int_tag(tags, b"l"),
        signed_at=_int_tag(tags, b"t"),
        expires=_int_tag(tags, b"x"),
        b_prefix=_text(b"".join(tags.get(b"b", b"").split())[:12]),
        **more,
    )


def _classify_validation(exc: dkim.ValidationError) -> tuple[str, str]:
    text = str(exc)
    if text.startswith("x= value is past"):
        return "fail", "signature expired (x= is past)"
    if text.startswith("t= value is in the future"):
        return "fail", "signature timestamp in the future (t=)"
    if text.startswith("body hash mismatch"):
        return "fail", "body hash mismatch"
    return "permerror", _reason(exc)


@lru_cache(maxsize=KEY_CACHE_SIZE)
def _check_key(record: bytes, algorithm: bytes) -> str:
    """Problems dkimpy does not check in a key record; "" when fine."""
    try:
        key = parse_tag_value(record)
    except Exception:  # malformed key record
        return "malformed key record"
    if key.get(b"p", None) == b"":
        return "key revoked (empty p=)"
    ktype = key.get(b"k", b"rsa")
    if not algorithm.startswith(ktype + b"-"):
        return f"key type {_text(ktype)} does not match a={_text(algorithm)}"
    hashes = key.get(b"h")
    if hashes is not None:
        allowed = {h.strip() for h in hashes.split(b":")}
        if algorithm.split(b"-", 1)[-1] not in allowed:
            return f"key does not allow {_text(algorithm)} (h={_text(hashes)})"
    return ""


def _verify_one(
    message: tuple[Fields, bytes],
    index: int,
    field: tuple[bytes, bytes],
    keys: KeyRecords,
    body_memo: dict[bytes, bytes],
) -> DkimSignatureResult:
    """One DKIM-Signature, with dkimpy's checks in dkimpy's order (``verify_headerprep``
    then ``verify_sig_process``), the message parsed once for all signatures."""
    if len(field[1]) > MAX_SIGNATURE_FIELD:
        return DkimSignatureResult(
            index, "permerror", f"signature field larger than {MAX_SIGNATURE_FIELD} bytes"
        )
    try:
        sig = parse_tag_value(field[1])
    except dkim.util.DuplicateTag as exc:
        return DkimSignatureResult(
            index, "permerror", f"duplicate tag {_text(exc.args[0] if exc.args else b'')}"
        )
    except dkim.util.InvalidTagValueList as exc:
        return DkimSignatureResult(index, "permerror", f"malformed tag list: {_reason(exc)}")
    try:
        dkim.validate_signature_fields(sig)
    except dkim.ValidationError as exc:
        return _describe(index, sig, *_classify_validation(exc))
    include = [h.lower() for h in _H_SEPARATOR.split(sig[b"h"])]
    name = key_name(sig)
    if name is None:
        return _describe(index, sig, "permerror", "d= or s= is not an ASCII domain name")
    record = keys.get(name)
    if record == TEMPERROR:
        return _describe(index, sig, "temperror", "key lookup timed out or failed")
    if not record:
        return _describe(index, sig, "permerror", "no key for signature")
    problem = _check_key(record, sig[b"a"])
    if problem:
        return _describe(index, sig, "permerror", problem)
    try:
        key = load_key(name, record)
    except (dkim.DKIMException, binascii.Error, ValueError) as exc:
        return _describe(index, sig, "permerror", f"bad key record: {_reason(exc)}")
    if key is None:
        return _describe(index, sig, "permerror", "key not for email (s= service type)")
    bits = key.bits
    if key.tlsrpt:
        return _describe(
            index, sig, "permerror", "key only for TLS reports (s=tlsrpt)", key_bits=bits
        )
    headers, body = message
    try:
        ok = verify_signature(
            headers,
            body,
            sig,
            include,
            field,
            key,
            min_bits=MIN_KEY_BITS,
            body_memo=body_memo,
        )
    except dkim.ValidationError as exc:
        return _describe(index, sig, *_classify_validation(exc), key_bits=bits)
    except dkim.KeyFormatError as exc:
        if str(exc).startswith("public key too small"):
            return _describe(index, sig, "permerror", f"key too short ({bits} bits)", key_bits=bits)
        return _describe(index, sig, "permerror", _reason(exc), key_bits=bits)
    except dkim.DKIMException as exc:
        return _describe(index, sig, "permerror", _reason(exc), key_bits=bits)
    if not ok:
        return _describe(index, sig, "fail", "signature did not verify", key_bits=bits)
    if sig[b"a"] == b"rsa-sha1":
        reason = "rsa-sha1 is historic (RFC 8301)"
        return _describe(index, sig, "pass", reason, key_bits=bits, weak=True)
    return _describe(index, sig, "pass", "", key_bits=bits)


def verify_dkim(raw: bytes, keys: KeyRecords, limit: int) -> DkimResults:
    """Verify the first ``limit`` DKIM-Signature fields; list the rest as not verified."""
    try:
        message = split_message(raw)
    except dkim.DKIMException:
        if not _HAS_SIGNATURE.search(raw.split(b"\r\n\r\n", 1)[0]):
            return DkimResults(limit=limit)
        # dkimpy's error quotes the offending header line: keep addresses out of the result.
        unparsable = DkimSignatureResult(0, "permerror", "message header block unparsable")
        return DkimResults(signatures=(unparsable,), total=1, limit=limit)
    fields = [(n, v) for n, v in message[0] if n.lower() == b"dkim-signature"]
    results: list[DkimSignatureResult] = []
    body_memo: dict[bytes, bytes] = {}  # canonical body per algorithm, shared by signatures
    for index, field in enumerate(fields):
        if index >= limit:
            results.append(
                DkimSignatureResult(
                    index, "permerror", f"not verified: more than {limit} signatures"
                )
            )
            continue
        try:
            results.append(_verify_one(message, index, field, keys, body_memo))
        except Exception as exc:  # dkimpy on hostile input must not stop mail
            results.append(
                DkimSignatureResult(index, "permerror", f"unverifiable: {type(exc).__name__}")
            )
    note = ""
    if len(fields) > limit:
        note = f"only the first {limit} of {len(fields)} signatures were verified"
    return DkimResults(signatures=tuple(results), total=len(fields), limit=limit, note=note)


_AMS_NO_SPACE = re.compile(rb"^(arc-message-signature:)(?=[^ \t])", re.IGNORECASE | re.MULTILINE)


def _arc_ready(raw: bytes) -> bytes:
    """dkimpy finds an AMS by looking for " i=N;" and fails (IndexError) on the valid
    ``ARC-Message-Signature:i=1;``. ARC signs header fields with relaxed canonicalization,
    which drops the space after the colon, so adding it changes no hash."""
    end = raw.find(b"\r\n\r\n")
    head, rest = (raw, b"") if end < 0 else (raw[: end + 2], raw[end + 2 :])
    return _AMS_NO_SPACE.sub(rb"\1 ", head) + rest


def verify_arc(raw: bytes, keys: KeyRecords) -> ArcResult:
    """Validate the ARC chain with dkimpy's ``ARC.verify`` and report cv= and oldest-pass."""
    asked_temp: list[bytes] = []

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes:
        record = keys.get(name)
        if record == TEMPERROR:
            asked_temp.append(name)
            raise dkim.DnsTimeoutError(f"lookup of {_text(name)} failed")
        return record or b""

    try:
        arc = dkim.ARC(_arc_ready(raw), logger=_quiet, minkey=MIN_KEY_BITS)
        instances, _headers = arc.sorted_arc_headers()
        if instances == 0:
            return ArcResult("none", reason="message is not ARC signed")
        if instances > MAX_ARC_INSTANCES:
            return ArcResult("fail", instances, reason=f"more than {MAX_ARC_INSTANCES} ARC sets")
        cv, data, reason = arc.verify(dnsfunc=dnsfunc)
    except dkim.DKIMException as exc:
        return ArcResult("fail", reason=_reason(exc))
    except Exception as exc:  # hostile ARC headers must not stop mail
        return ArcResult("fail", reason=f"unverifiable: {type(exc).__name__}")
    result = {dkim.CV_Pass: "pass", dkim.CV_None: "none"}.get(cv, "fail")
    if result != "pass" and asked_temp:
        result, reason = "temperror", "ARC key lookup timed out or failed"
    # oldest-pass: the oldest instance of an unbroken run of validating AMSs from the
    # newest down; 0 when every AMS validates (RFC 8617 5.2).
    oldest: int | None = None
    for item in data:  # newest first
        if not item.get("ams-valid"):
            break
        oldest = int(item["instance"])
    if oldest == 1:
        oldest = 0
    domains = tuple(_text(item.get("as-domain")).lower() for item in data)
    return ArcResult(
        result=result,
        instances=instances,
        oldest_pass=oldest if result == "pass" else None,
        domains=domains,
        reason=_reason(Exception(reason)) if reason != "success" else "",
    )


def verify_message(
    raw: bytes, keys: KeyRecords, limit: int, arc: bool
) -> tuple[DkimResults, ArcResult]:
    """DKIM then (when ARC headers are present) ARC; picklable for a process pool."""
    dkim_results = verify_dkim(raw, keys, limit)
    arc_result = verify_arc(raw, keys) if arc else ArcResult("none")
    return dkim_results, arc_result

"""DKIM signature maths through OpenSSL (``cryptography``), around dkimpy's checks.

dkimpy checks RSA in pure Python: big-integer ``pow``, byte-at-a-time conversions and an
ASN.1 parse of the key on every message, about 0.4 ms of the 0.6 ms one RSA-2048
signature costs (bench/results/auth.md). What decides *what* is verified stays dkimpy's:
the key record (``evaluate_pk``), the canonicalisation policy (``c=``) and the bottom-up
choice of signed fields (``select_headers``); tag parsing and validation happen in
auth/verify.py. The header hash follows dkimpy's ``hash_headers`` over fields
canonicalised by auth/dkimparse.py (same bytes, cheaper), and the signature check itself
("does this signature match this digest under this key") runs in C, with keys parsed
once per distinct record.

Same results as dkimpy's ``verify_sig_process`` (the dkim-samples corpus and
tests/test_auth_dkim.py hold both to it), except that a key under ``min_bits`` is a
permerror before any maths, not only when its signature verifies (RFC 8301 3.2: such keys
MUST NOT be considered valid).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import dkim
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey, RSAPublicNumbers
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError

from relay.auth.dkimparse import relaxed_body, relaxed_header, without_b_value
from relay.errors import RelayError
from relay.message import Fields

KEY_CACHE_SIZE = 1024  # distinct key records kept parsed per process (~1 KB each)

_WSP = re.compile(rb"\s+")
# a= -> (hashlib constructor, the same hash for OpenSSL's prehashed RSA check)
_HASHES: dict[bytes, tuple[Callable[..., Any], hashes.HashAlgorithm]] = {
    b"rsa-sha256": (hashlib.sha256, hashes.SHA256()),
    b"rsa-sha1": (hashlib.sha1, hashes.SHA1()),  # noqa: S303 - verified, reported weak
    b"ed25519-sha256": (hashlib.sha256, hashes.SHA256()),
}


@dataclass(frozen=True)
class PublicKey:
    """A parsed DKIM key record (RFC 6376 3.6.1, RFC 8463)."""

    key: RSAPublicKey | Ed25519PublicKey
    bits: int
    ktype: bytes  # b"rsa" or b"ed25519"
    tlsrpt: bool  # s=tlsrpt: a key only for TLS reports (RFC 8460)


class BodyHashMismatch(RelayError, dkim.ValidationError):  # type: ignore[misc]
    """The bh= tag does not match the canonicalised body."""


@lru_cache(maxsize=KEY_CACHE_SIZE)
def load_key(name: bytes, record: bytes) -> PublicKey | None:
    """Parse a key record with dkimpy's ``evaluate_pk`` and load it into OpenSSL once.
    None when the record is for another service (s=). Raises dkim.KeyFormatError,
    binascii.Error or ValueError for a bad record (failures are not cached)."""
    pk, bits, ktype, tlsrpt = dkim.evaluate_pk(name, record)
    if pk is None:
        return None
    if ktype == b"ed25519":
        return PublicKey(Ed25519PublicKey.from_public_bytes(bytes(pk)), 256, ktype, tlsrpt)
    try:
        rsa = RSAPublicNumbers(int(pk["publicExponent"]), int(pk["modulus"])).public_key()
    except UnsupportedAlgorithm as exc:
        raise ValueError(str(exc)) from exc
    return PublicKey(rsa, int(bits), ktype, tlsrpt)


def _canonical_body(body: bytes, policy: CanonicalizationPolicy, memo: dict[bytes, bytes]) -> bytes:
    # Signatures of one message usually share a body algorithm: canonicalise once.
    name: bytes = policy.body_algorithm.name
    if name not in memo:
        if name == b"relaxed":
            memo[name] = relaxed_body(body)
        else:
            memo[name] = policy.body_algorithm.canonicalize_body(body)
    return memo[name]


def _signed_headers(
    headers: Fields, policy: CanonicalizationPolicy, include: list[bytes]
) -> Fields:
    """The header fields dkimpy's ``select_headers`` can pick, canonicalised. dkimpy
    canonicalises every field of the message for each signature; only the named ones
    matter, and keeping their order keeps its bottom-up selection the same."""
    wanted = set(include)
    fields = [(n, v) for n, v in headers if n.lower() in wanted or n.lower().rstrip() in wanted]
    if policy.header_algorithm.name == b"relaxed":
        return [relaxed_header(n, v) for n, v in fields]
    return fields


def _hash_headers(
    hasher: Any,
    policy: CanonicalizationPolicy,
    fields: Fields,
    include: list[bytes],
    sig_header: tuple[bytes, bytes],
) -> None:
    """dkimpy's ``hash_headers``: the fields picked bottom-up by its ``select_headers``,
    then the signature field itself, its b= value removed and no CRLF at the end."""
    name, value = sig_header
    if policy.header_algorithm.name == b"relaxed":
        name, value = relaxed_header(name, without_b_value(value))
    else:
        value = without_b_value(value)
    for field_name, field_value in dkim.select_headers(fields, include):
        hasher.update(field_name + b":" + field_value)
    hasher.update(name + b":" + value.rstrip())


def verify_signature(
    headers: Fields,
    body: bytes,
    sig: dict[bytes, bytes],
    include: list[bytes],
    sig_header: tuple[bytes, bytes],
    key: PublicKey,
    *,
    min_bits: int,
    body_memo: dict[bytes, bytes],
) -> bool:
    """True when the signature verifies; raises dkim.ValidationError (body hash, c=) or
    dkim.KeyFormatError (key too short, key/algorithm mismatch) like dkimpy does."""
    if key.ktype == b"rsa" and key.bits < min_bits:
        raise dkim.KeyFormatError(f"public key too small: {key.bits}")
    try:
        policy = CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
    except InvalidCanonicalizationPolicyError as exc:
        raise dkim.MessageFormatError(f"invalid c= value: {exc.args[0]!r}") from exc
    algorithm = sig[b"a"]
    if algorithm not in _HASHES or not algorithm.startswith(key.ktype + b"-"):
        raise dkim.KeyFormatError(f"key type {key.ktype!r} cannot verify a={algorithm!r}")
    new_hash, openssl_hash = _HASHES[algorithm]
    if b"bh" in sig:
        canonical = _canonical_body(body, policy, body_memo)
        if b"l" in sig:
            canonical = canonical[: int(sig[b"l"])]
        try:
            expected = base64.b64decode(_WSP.sub(b"", sig[b"bh"]))
        except binascii.Error as exc:
            raise dkim.MessageFormatError(str(exc)) from exc
        if new_hash(canonical).digest() != expected:
            raise BodyHashMismatch("body hash mismatch")
    # dkimpy's fix for Debian bug 644046: a second From field is hashed too, so a message
    # with two From fields fails rather than verifying for the one a reader may not see.
    if b"from" in include:
        include = [*include, b"from"]
    hasher = new_hash()
    _hash_headers(hasher, policy, _signed_headers(headers, policy, include), include, sig_header)
    try:
        signature = base64.b64decode(_WSP.sub(b"", sig[b"b"]))
    except binascii.Error as exc:
        raise dkim.MessageFormatError(str(exc)) from exc
    try:
        if isinstance(key.key, RSAPublicKey):
            key.key.verify(signature, hasher.digest(), padding.PKCS1v15(), Prehashed(openssl_hash))
        else:
            key.key.verify(signature, hasher.digest())  # RFC 8463: signs the SHA-256 digest
    except (InvalidSignature, ValueError):
        return False
    return True

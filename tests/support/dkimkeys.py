"""Signing keys and signed messages for authentication tests and benches, made with dkimpy.

Keys are generated on the spot (RSA with ``cryptography``, Ed25519 with PyNaCl); a key's
``txt`` is the DNS record to serve at ``key.name`` from LocalDns. ``sign`` can add or
override tags (x=, t=) that dkimpy's signer does not offer, still producing a valid
signature over them.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dkim
import nacl.encoding
import nacl.signing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


@dataclass(frozen=True)
class SigningKey:
    domain: str
    selector: str
    private: bytes  # PEM (RSA) or base64 seed (Ed25519), as dkimpy's signer takes them
    algorithm: bytes  # rsa-sha256 | ed25519-sha256
    txt: str  # the DNS TXT record value

    @property
    def name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}."


def _rsa_txt(public: rsa.RSAPublicKey) -> str:
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()


def _pem(private: rsa.RSAPrivateKey) -> bytes:
    return private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def rsa_key(domain: str, selector: str, bits: int = 2048) -> SigningKey:
    private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return SigningKey(
        domain, selector, _pem(private), b"rsa-sha256", _rsa_txt(private.public_key())
    )


def _probable_prime(bits: int, rng: random.Random) -> int:
    while True:
        n = rng.getrandbits(bits) | (1 << (bits - 1)) | 1
        if all(n % p for p in (3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)) and _miller_rabin(n, rng):
            return n


def _miller_rabin(n: int, rng: random.Random, rounds: int = 32) -> bool:
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for _ in range(rounds):
        x = pow(rng.randrange(2, n - 1), d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def short_rsa_key(domain: str, selector: str, bits: int = 512) -> SigningKey:
    """An RSA key too short to trust (RFC 8301); ``cryptography`` refuses to generate one,
    so the primes are found here and the key assembled from its numbers."""
    rng = random.Random(bits)  # deterministic: the same weak key every run
    e = 65537
    while True:
        p, q = _probable_prime(bits // 2, rng), _probable_prime(bits // 2, rng)
        phi = (p - 1) * (q - 1)
        if p != q and phi % e and (p * q).bit_length() == bits:
            break
    d = pow(e, -1, phi)
    numbers = rsa.RSAPrivateNumbers(
        p=p,
        q=q,
        d=d,
        dmp1=d % (p - 1),
        dmq1=d % (q - 1),
        iqmp=pow(q, -1, p),
        public_numbers=rsa.RSAPublicNumbers(e, p * q),
    )
    private = numbers.private_key(unsafe_skip_rsa_key_validation=True)
    return SigningKey(
        domain, selector, _pem(private), b"rsa-sha256", _rsa_txt(private.public_key())
    )


def ed25519_key(domain: str, selector: str) -> SigningKey:
    private = nacl.signing.SigningKey.generate()
    seed = private.encode(encoder=nacl.encoding.Base64Encoder)
    public = private.verify_key.encode(encoder=nacl.encoding.Base64Encoder).decode()
    return SigningKey(domain, selector, seed, b"ed25519-sha256", f"v=DKIM1; k=ed25519; p={public}")


class _Signer(dkim.DKIM):  # type: ignore[misc]
    """dkimpy's signer with extra or replaced tags (x=, t=) covered by the signature."""

    def __init__(self, message: bytes, tags: Mapping[bytes, bytes]) -> None:
        super().__init__(message)
        self._extra = dict(tags)

    def gen_header(self, fields: list[tuple[bytes, bytes]], *args: Any, **kwargs: Any) -> Any:
        fields = [(k, self._extra.pop(k, v)) for k, v in fields]
        fields[-1:-1] = list(self._extra.items())  # before b=, which must stay last
        return super().gen_header(fields, *args, **kwargs)


def sign(
    message: bytes,
    key: SigningKey,
    *,
    algorithm: bytes | None = None,
    canonicalize: tuple[bytes, bytes] = (b"relaxed", b"relaxed"),
    include_headers: Sequence[bytes] | None = None,
    length: bool = False,
    tags: Mapping[bytes, bytes] | None = None,
) -> bytes:
    """``message`` with a DKIM-Signature by ``key`` prepended."""
    signer = _Signer(message, tags or {})
    header = signer.sign(
        key.selector.encode(),
        key.domain.encode(),
        key.private,
        signature_algorithm=algorithm or key.algorithm,
        canonicalize=canonicalize,
        include_headers=list(include_headers) if include_headers else None,
        length=length,
    )
    return bytes(header) + message


def make_message(
    from_addr: str = "Alice <alice@example.com>",
    to: str = "bob@example.org",
    subject: str = "Lunch on Friday",
    body: str = "Shall we meet at noon?\r\n",
    extra: Sequence[tuple[str, str]] = (),
) -> bytes:
    """A small CRLF message."""
    lines = [
        f"From: {from_addr}",
        f"To: {to}",
        f"Subject: {subject}",
        "Date: Mon, 23 Nov 2026 10:00:00 +0000",
        "Message-ID: <test.1@example.com>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        *(f"{name}: {value}" for name, value in extra),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()

"""The benchmark's test message and the DNS records that authenticate it.

Generated, never corpus mail: a ~4 KB plain-text message from bench.test, DKIM-signed
(RSA-2048, key made with the openssl command line) so that the authentication variant
verifies a real signature, with SPF, DKIM and DMARC records for a loopback DNS server.
"""

from __future__ import annotations

import base64
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import dkim

DOMAIN = "bench.test"
SELECTOR = "bench"
HELO = "mail.bench.test"
SENDER = "from@bench.test"
RECIPIENT = "to@example.org"
TTL = 86400  # the cache stays warm for the whole run

_WORDS = (
    "relay",
    "quarterly",
    "invoice",
    "meeting",
    "schedule",
    "update",
    "project",
    "review",
    "budget",
    "report",
    "notes",
    "customer",
    "delivery",
    "account",
    "service",
    "network",
    "policy",
    "message",
    "summary",
    "team",
    "agenda",
    "draft",
    "office",
    "travel",
    "request",
    "approval",
    "contract",
    "figures",
    "weekly",
    "monthly",
    "release",
    "testing",
)


@dataclass(frozen=True, slots=True)
class BenchMail:
    message: bytes  # CRLF line endings, as sent on the wire
    signed: bool
    zone: dict[str, list[tuple[str, str, int]]]

    def write_for_smtp_source(self, path: Path) -> Path:
        """smtp-source -F appends CRLF to each line, so the file has bare LF endings."""
        path.write_bytes(self.message.replace(b"\r\n", b"\n"))
        return path


def _body(size: int, seed: int = 7) -> bytes:
    rng = random.Random(seed)
    lines: list[str] = []
    total = 0
    while total < size:
        words = [rng.choice(_WORDS) for _ in range(rng.randint(8, 11))]
        line = " ".join(words).capitalize() + "."
        lines.append(line)
        total += len(line) + 2
    return ("\r\n".join(lines) + "\r\n").encode()


def _rsa_key(workdir: Path) -> tuple[bytes, str] | None:
    """(private key PEM, public key base64 DER) from openssl, or None without openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    key = workdir / "dkim.key"
    subprocess.run(
        [openssl, "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", key],
        check=True,
        capture_output=True,
    )
    der = subprocess.run(
        [openssl, "pkey", "-in", key, "-pubout", "-outform", "DER"],
        check=True,
        capture_output=True,
    ).stdout
    return key.read_bytes(), base64.b64encode(der).decode()


def build(workdir: Path, size: int = 4096) -> BenchMail:
    headers = (
        f"From: Bench Sender <sender@{DOMAIN}>\r\n"
        f"To: <{RECIPIENT}>\r\n"
        "Subject: Weekly project notes\r\n"
        "Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
        f"Message-ID: <bench-0001@{DOMAIN}>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
    ).encode()
    signature_room = 600  # the DKIM-Signature field added below, so the total is ~size
    message = headers + _body(size - len(headers) - signature_room)
    zone: dict[str, list[tuple[str, str, int]]] = {
        f"{DOMAIN}.": [("TXT", "v=spf1 ip4:127.0.0.0/8 -all", TTL), ("MX", f"10 {HELO}.", TTL)],
        f"{HELO}.": [("A", "127.0.0.1", TTL), ("TXT", "v=spf1 a -all", TTL)],
        f"_dmarc.{DOMAIN}.": [("TXT", "v=DMARC1; p=reject; adkim=r; aspf=r", TTL)],
        "1.0.0.127.in-addr.arpa.": [("PTR", f"{HELO}.", TTL)],
    }
    key = _rsa_key(workdir)
    if key is None:
        return BenchMail(message=message, signed=False, zone=zone)
    private, public = key
    signature = dkim.sign(
        message,
        SELECTOR.encode(),
        DOMAIN.encode(),
        private,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
    )
    zone[f"{SELECTOR}._domainkey.{DOMAIN}."] = [("TXT", f"v=DKIM1; k=rsa; p={public}", TTL)]
    return BenchMail(message=signature + message, signed=True, zone=zone)

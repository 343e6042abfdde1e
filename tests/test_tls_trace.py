"""STARTTLS inbound and the RFC 5321 Received trace field."""

from __future__ import annotations

import datetime
from pathlib import Path

import aiosmtplib
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relay.errors import ConfigError
from tests.support.relay import make_settings, running_relay, send, simple_message


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay.test")])
    # Valid from 2000 to 2100, whatever day the tests run (or the clock claims).
    start = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start.replace(year=2100))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def delivered(tmp_path: Path) -> bytes:
    (path,) = (tmp_path / "maildir" / "new").iterdir()
    return path.read_bytes()


async def test_starttls_is_offered_and_recorded_in_received(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    settings = make_settings(tmp_path, {"smtp": {"tls_cert": str(cert), "tls_key": str(key)}})
    async with running_relay(settings) as relay:
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=relay.port, start_tls=True, validate_certs=False
        )
        await client.connect()
        await client.sendmail("alice@sender.test", ["bob@example.org"], simple_message())
        await client.quit()
    data = delivered(tmp_path)
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    assert head.startswith("Return-Path: <alice@sender.test>\r\nReceived: from ")
    assert "by relay.test (relay) with ESMTPS (TLSv1." in head
    assert "for <bob@example.org>" in head
    assert data.endswith(simple_message())


async def test_plain_session_trace(tmp_path: Path) -> None:
    async with running_relay(make_settings(tmp_path)) as relay:
        await send(relay.port, ["bob@example.org", "carol@example.org"], simple_message())
    head = delivered(tmp_path).split(b"\r\n\r\n", 1)[0].decode()
    assert "with ESMTP id " in head and "ESMTPS" not in head
    assert "for <" not in head  # several recipients: none disclosed to the others


async def test_unreadable_certificate_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    settings = make_settings(
        tmp_path, {"smtp": {"tls_cert": str(missing), "tls_key": str(missing)}}
    )
    with pytest.raises(ConfigError, match=r"smtp\.tls_cert"):
        async with running_relay(settings):
            pass


async def test_starttls_at_the_connection_limit_keeps_its_session(tmp_path: Path) -> None:
    """The TLS handshake re-enters connection_made: the session is the same one, so it is
    neither refused by the connection limit nor counted twice."""
    cert, key = self_signed(tmp_path)
    settings = make_settings(
        tmp_path,
        {"smtp": {"tls_cert": str(cert), "tls_key": str(key), "max_connections": 1}},
    )
    async with running_relay(settings) as relay:
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=relay.port, start_tls=True, validate_certs=False
        )
        await client.connect()
        await client.sendmail("alice@sender.test", ["bob@example.org"], simple_message())
        assert len(relay.sessions.open) == 1
        await client.quit()
    assert delivered(tmp_path).endswith(simple_message())

"""Real signed messages (shared/corpora/dkim-samples) must give exactly their known results:
directly through the Authenticator, and through the relay over SMTP in the delivered
Authentication-Results header. Keys come from the corpus, served by a loopback DNS."""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from relay.auth.checker import Authenticator
from relay.cli.scan import ScanRequest, scan
from relay.message import Message
from tests.conftest import shared_dir
from tests.support.authenv import authenticator, incoming
from tests.support.dnsserver import LocalDns
from tests.support.relay import make_settings, running_relay, send, sink_server

pytestmark = pytest.mark.corpus

TARBALL = shared_dir() / "corpora" / "dkim-samples" / "dkim-samples.tar.gz"

# MANIFEST "sig=" outcomes and the result they must give here. Samples without a cached
# key get no DNS record, which RFC 6376 6.1.2 makes a permanent error ("no key").
EXPECTED = {
    "pass": "pass",
    "err:x= value is past": "fail",  # expired: the README's stalwart__dkim_005
    "err:body hash mismatch": "fail",
    "no-cached-key": "permerror",
}
_SIG = re.compile(
    r"(?P<d>[^\s/;]+)/(?P<s>[^/]+)/(?P<a>[a-z0-9-]+)/(?P<c>[a-z/]+): "
    r"bh=(?P<bh>\w+), sig=(?P<sig>pass|no-cached-key|err:[^;(]*)"
)


@dataclass(frozen=True)
class Sample:
    name: str
    raw: bytes
    expected: tuple[tuple[str, str], ...]  # (d=, result) per signature, top first


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not TARBALL.exists():
        pytest.skip(f"DKIM samples not found at {TARBALL} (set RELAY_SHARED)")
    root = tmp_path_factory.mktemp("dkim")
    with tarfile.open(TARBALL) as tar:
        tar.extractall(root, filter="data")
    return root / "dkim-samples"


def _expected(column: str) -> tuple[tuple[str, str], ...]:
    out = []
    for m in _SIG.finditer(column):
        outcome = m.group("sig").strip()
        key = next(k for k in EXPECTED if outcome.startswith(k))
        out.append((m.group("d"), EXPECTED[key]))
    return tuple(out)


@pytest.fixture(scope="session")
def samples(corpus: Path) -> list[Sample]:
    rows = (corpus / "MANIFEST.tsv").read_text().splitlines()[1:]
    out = []
    for row in rows:
        cols = row.split("\t")
        name, column = cols[0], cols[-1]
        expected = _expected(column)
        assert expected or "no DKIM-Signature" in column, f"unreadable MANIFEST row {name}"
        data = (corpus / "messages" / name).read_bytes()
        raw = Message.from_file_bytes(data, received_at=0.0).raw  # only the bytes matter
        out.append(Sample(name, raw, expected))
    assert len(out) == 30
    return out


@pytest.fixture(scope="session")
def dns(corpus: Path) -> Iterator[LocalDns]:
    zone: dict[str, list[tuple[Any, ...]]] = {}
    for path in (corpus / "keys").glob("*._domainkey.*.txt"):
        zone[path.name.removesuffix(".txt") + "."] = [("TXT", path.read_text().strip())]
    with LocalDns(zone) as server:
        yield server


@pytest.fixture
async def auth(dns: LocalDns) -> AsyncIterator[Authenticator]:
    async with authenticator(dns, timeout=1.0) as a:
        yield a


async def test_every_sample_gives_its_known_result(
    auth: Authenticator, samples: list[Sample]
) -> None:
    mismatches = []
    for sample in samples:
        results = await auth.check(incoming(sample.raw, mail_from="", helo="corpus.test"))
        got = tuple((s.domain, s.result) for s in results.dkim.signatures)
        if got != sample.expected:
            mismatches.append((sample.name, got, sample.expected))
    assert not mismatches


async def test_known_cases_in_detail(auth: Authenticator, samples: list[Sample]) -> None:
    by_name = {s.name: s for s in samples}
    expired = await auth.check(incoming(by_name["stalwart__dkim_005.eml"].raw))
    assert "expired" in expired.dkim.signatures[0].reason
    sha1 = await auth.check(incoming(by_name["blaze__001.eml"].raw))
    assert [s.weak for s in sha1.dkim.signatures] == [True, True]
    rfc8463 = await auth.check(incoming(by_name["mimekit__rfc8463-example.eml"].raw))
    assert [(s.algorithm, s.result) for s in rfc8463.dkim.signatures] == [
        ("ed25519-sha256", "pass"),
        ("rsa-sha256", "pass"),
    ]
    mismatch = await auth.check(incoming(by_name["stalwart__arc_001.eml"].raw))
    assert mismatch.dkim.signatures[2].reason == "body hash mismatch"
    arc_only = await auth.check(incoming(by_name["blaze__005.eml"].raw))
    assert (arc_only.dkim.result, arc_only.arc.result, arc_only.arc.instances) == (
        "none",
        "pass",
        3,
    )


def _dkim_in_header(data: bytes) -> tuple[tuple[str, str], ...]:
    head = data.split(b"\r\n\r\n", 1)[0].decode("ascii", "replace")
    # Our Received trace field comes first, then our one Authentication-Results field.
    assert head.startswith("Received: from ")
    assert head.count("Authentication-Results: relay.test;") == 1
    field = re.search(
        r"^Authentication-Results: relay\.test;.*?(?=\r\n[^ \t]|\Z)", head, re.S | re.M
    )
    assert field is not None
    out = []
    for resinfo in field.group(0).split(";")[1:]:
        m = re.match(r"\s*dkim=(\w+)", resinfo)
        d = re.search(r"header\.d=([^\s;]+)", resinfo)
        if m and d:
            out.append((d.group(1), m.group(1)))
    return tuple(out)


@pytest.mark.slow
async def test_through_the_relay_over_smtp(
    tmp_path: Path, dns: LocalDns, samples: list[Sample]
) -> None:
    async with sink_server() as sink:
        settings = make_settings(
            tmp_path,
            {
                "auth": {"enabled": True, "authserv_id": "relay.test"},
                "dns": {"nameservers": [dns.address], "timeout": 1},
                "delivery": {"mode": "smtp", "downstream": sink.address},
            },
        )
        async with running_relay(settings) as relay:
            for sample in samples:
                await send(relay.port, ["bob@example.org"], sample.raw, sender="corpus@sender.test")
        assert len(sink.messages) == len(samples)
        mismatches = []
        for sample, received in zip(samples, sink.messages, strict=True):
            assert received.data.count(b"Authentication-Results: relay.test") == 1
            got = _dkim_in_header(received.data)
            if got != sample.expected:
                mismatches.append((sample.name, got, sample.expected))
        assert not mismatches


async def test_relay_scan_prints_auth_facts(tmp_path: Path, dns: LocalDns, corpus: Path) -> None:
    settings = make_settings(
        tmp_path,
        {"auth": {"enabled": True}, "dns": {"nameservers": [dns.address], "timeout": 1}},
    )
    path = corpus / "messages" / "mimekit__rfc8463-example.eml"
    out = await scan(settings, ScanRequest(path=path, mail_from="joe@football.example.com"))
    facts = json.loads(json.dumps(out))["facts"]
    assert facts["dkim_result"] == "pass"
    assert facts["dkim_domains_pass"] == ["football.example.com"]
    assert facts["dkim_key_bits"] == 256  # the smallest passing key: Ed25519's
    assert [s["algorithm"] for s in facts["dkim"]["signatures"]] == [
        "ed25519-sha256",
        "rsa-sha256",
    ]
    assert facts["from_domain"] == "football.example.com"
    assert facts["spf"] == "none" and facts["dmarc"] == "none"

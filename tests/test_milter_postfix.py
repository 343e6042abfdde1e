"""The milter door behind a real, private Postfix (tests/support/postfix.py), configured
with deploy/postfix/milter.main.cf, milter.master.cf and milter.toml verbatim but for the
ports (``127.0.0.1:8891``, the relay; ``127.0.0.1:10026``, the release listener) and the
relay's scratch paths. The relay is a real ``relay milter`` process with DNS from a
loopback server; mail goes client -> Postfix (smtpd_milters -> relay) -> aiosmtpd sink.

Checked as the client and the sink see it: every verdict, the delivered bytes (the
original message exactly, plus Postfix's Received and our fields, minus the forged
ones), a quarantined message released through the release listener, and a relay killed
mid-session: Postfix tempfails, nothing is queued or delivered unfiltered.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.dnsserver import LocalDns
from tests.support.postfix import (
    Postfix,
    ThreadedSink,
    free_ports,
    main_cf_settings,
    postfix_or_skip,
    running_postfix,
    send,
    snippet,
)

pytestmark = pytest.mark.slow

INTERNET = "127.0.0.2"
RELAY_IN_SNIPPET = "127.0.0.1:8891"
RELEASE_IN_SNIPPET = "127.0.0.1:10026"
QUARANTINE_IN_SNIPPET = "/var/lib/relay/quarantine"

POLICY = """\
[policy]
name = "milter-postfix"
mode = "enforce"

[policy.thresholds]
tag = 5
quarantine = 10
reject = 15

[[rule]]
name = "tag_me"
when = 'mail_from_domain == "tag.test"'
score = 6
reason = "tag sender"

[[rule]]
name = "reject_me"
when = 'mail_from_domain == "reject.test"'
action = "reject"
reason = "Refused by the milter test policy"

[[rule]]
name = "tempfail_me"
when = 'mail_from_domain == "tempfail.test"'
action = "tempfail"
reason = "Come back later"

[[rule]]
name = "quarantine_me"
when = 'mail_from_domain == "quarantine.test"'
action = "quarantine"
reason = "held"
"""

# Header shapes a rebuild could get wrong: folding with tabs and spaces, no space after
# the colon, 8-bit bytes, trailing blanks, an empty value, a long line; a sender's own
# X-Spam-Flag and an Authentication-Results in our name, both to be removed.
TRICKY = (
    b"From: Alice <alice@{domain}>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: =?utf-8?q?caf=C3=A9?= and \xc3\xa9 raw\r\n"
    b"X-Folded: first\r\n\tsecond\r\n    third  \r\n"
    b"X-NoSpace:value\r\n"
    b"X-Empty:\r\n"
    b"X-Spam-Flag: NO\r\n"
    b"Authentication-Results: relay.test; dkim=pass header.d=forged.test\r\n"
    b"Message-ID: <milter-{n}@{domain}>\r\n"
    b"Date: Mon, 07 Dec 2026 10:00:00 +0000\r\n"
    b"X-Long: " + b"x" * 900 + b"\r\n"
    b"\r\n"
    b"Body line one.\r\n"
    b"..dot-stuffed on the wire, one dot here\r\n"
    b"\r\n"
    b"last line without much\r\n"
)


def tricky(domain: str, n: int) -> bytes:
    return TRICKY.replace(b"{domain}", domain.encode()).replace(b"{n}", str(n).encode())


@dataclass
class MilterRelay:
    """``relay milter`` as a process on a fixed port, which a test may kill."""

    work: Path
    config: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.work / "relay.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relay.cli", "milter", "--config", str(self.config)],
            cwd=self.work,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"relay exited early\n{self.log_tail()}"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=2).close()
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"relay milter did not listen\n{self.log_tail()}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self) -> str:
        path = self.work / "relay.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


@dataclass
class Setup:
    postfix: Postfix
    sink: ThreadedSink
    relay: MilterRelay
    release_port: int


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    postfix_or_skip()
    work = tmp_path_factory.mktemp("milter-postfix")
    port, release = free_ports(2)
    (work / "policy.toml").write_text(POLICY)
    relay_toml = snippet(
        "milter.toml",
        {
            RELAY_IN_SNIPPET: f"127.0.0.1:{port}",
            RELEASE_IN_SNIPPET: f"127.0.0.1:{release}",
            QUARANTINE_IN_SNIPPET: str(work / "quarantine"),
        },
    )
    zone = {"tag.test.": [("TXT", f"v=spf1 ip4:{INTERNET} -all")]}
    with LocalDns(zone) as dns, ThreadedSink() as sink:
        (work / "relay.toml").write_text(
            relay_toml
            + f"""
[smtp]
hostname = "relay.test"

[dns]
nameservers = ["{dns.address}"]
timeout = 2

[model]
enabled = false

[metrics]
enabled = false

[policy]
path = "{work / "policy.toml"}"

[state]
path = "{work / "state.sqlite3"}"

[security]
key_file = "{work / "relay.key"}"
"""
        )
        relay = MilterRelay(work, work / "relay.toml", port)
        relay.start()
        main = main_cf_settings(snippet("milter.main.cf", {RELAY_IN_SNIPPET: f"127.0.0.1:{port}"}))
        master = snippet("milter.master.cf", {RELEASE_IN_SNIPPET: f"127.0.0.1:{release}"})
        try:
            with running_postfix(
                "milter", relayhost=sink.address, main=main, master=master
            ) as postfix:
                yield Setup(postfix, sink, relay, release)
        finally:
            relay.stop()


async def _deliver(setup: Setup, sender: str, data: bytes, marker: bytes) -> bytes:
    """Send through Postfix; the message (the one carrying ``marker``) at the sink."""
    result = await send(
        setup.postfix.port, ["bob@example.org"], data, sender=sender, client_ip=INTERNET
    )
    assert result.code == 250, (result, setup.relay.log_tail(), setup.postfix.log_tail())
    await setup.postfix.wait_log(rf"{result.queue_id}: .*status=sent")
    found = await setup.sink.wait_for_match(lambda m: marker in m.data, "delivered")
    return found.data


def _split(data: bytes) -> tuple[list[bytes], bytes]:
    """Header fields (each with its continuation lines) and the rest from the blank line."""
    head, sep, body = data.partition(b"\r\n\r\n")
    fields: list[bytes] = []
    for line in (head + b"\r\n").split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t"):
            fields[-1] += b"\r\n" + line
        else:
            fields.append(line)
    return fields, sep + body


async def test_accepted_mail_arrives_byte_exact_but_for_our_fields(setup: Setup) -> None:
    original = tricky("plain.test", 1)
    delivered = await _deliver(setup, "alice@plain.test", original, b"<milter-1@")
    fields, rest = _split(delivered)
    sent_fields, sent_rest = _split(original)
    assert rest == sent_rest, "the body is never touched"
    # Ours on top (index 0 is above Postfix's own Received): Authentication-Results.
    assert fields[0].startswith(b"Authentication-Results: relay.test;")
    assert b"spf=none smtp.mailfrom=alice@plain.test" in fields[0]
    assert b"smtp.helo=client.sender.test" in fields[0], "judged the client, not Postfix"
    assert b"forged.test" not in fields[0]
    assert fields[1].startswith(b"Received: from client.sender.test")
    # Everything else exactly as sent, in order, without the two fields we remove.
    removed = {
        b"X-Spam-Flag: NO",
        b"Authentication-Results: relay.test; dkim=pass header.d=forged.test",
    }
    assert fields[2:] == [f for f in sent_fields if f not in removed]


async def test_tag_adds_the_score_fields(setup: Setup) -> None:
    delivered = await _deliver(setup, "alice@tag.test", tricky("tag.test", 2), b"<milter-2@")
    fields, _ = _split(delivered)
    names = [f.split(b":", 1)[0] for f in fields[:6]]
    assert names == [
        b"X-Spam-Score",
        b"X-Spam-Status",
        b"X-Spam-Rules",
        b"Authentication-Results",
        b"Received",
        b"From",
    ], fields[:6]
    assert fields[0] == b"X-Spam-Score: 6.00"
    assert fields[2] == b"X-Spam-Rules: tag_me=+6"
    assert b"spf=pass" in fields[3], "SPF judged the original client, not Postfix"
    assert not any(f.startswith(b"X-Spam-Flag") for f in fields)


@pytest.mark.parametrize(
    ("sender", "code", "text"),
    [
        ("x@reject.test", 550, "5.7.1 Refused by the milter test policy"),
        ("x@tempfail.test", 451, "4.7.1 Come back later"),
    ],
)
async def test_refusals_reach_the_client(setup: Setup, sender: str, code: int, text: str) -> None:
    before = len(setup.sink.messages)
    result = await send(
        setup.postfix.port,
        ["bob@example.org"],
        tricky("x.test", 3),
        sender=sender,
        client_ip=INTERNET,
    )
    assert (result.code, result.stage) == (code, "data"), result
    assert result.text.startswith(text), result
    await setup.postfix.wait_queue_empty()
    assert len(setup.sink.messages) == before


async def test_quarantine_discards_and_release_delivers(setup: Setup) -> None:
    result = await send(
        setup.postfix.port,
        ["bob@example.org"],
        tricky("quarantine.test", 4),
        sender="q@quarantine.test",
        client_ip=INTERNET,
    )
    assert result.code == 250, result
    await setup.postfix.wait_log(rf"{result.queue_id}: milter-discard")
    cli = [sys.executable, "-m", "relay.cli", "quarantine", "--config", str(setup.relay.config)]
    listed = subprocess.run(
        [*cli, "list", "--json"],
        cwd=setup.relay.work,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.splitlines()
    assert len(listed) == 1, listed
    qid = json.loads(listed[0])["id"]
    assert all(b"<milter-4@" not in m.data for m in setup.sink.messages)
    done = subprocess.run(
        [*cli, "release", qid], cwd=setup.relay.work, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, (done.stdout, done.stderr, setup.postfix.log_tail())
    released = await setup.sink.wait_for_match(lambda m: b"<milter-4@" in m.data, "released")
    assert released.rcpt_tos == ("bob@example.org",)
    assert released.data.count(b"X-Spam-Status:") == 0, "quarantine adds no score fields"


async def test_relay_killed_mid_session_makes_postfix_tempfail(setup: Setup) -> None:
    import aiosmtplib

    client = aiosmtplib.SMTP(
        hostname="127.0.0.1",
        port=setup.postfix.port,
        source_address=(INTERNET, 0),
        local_hostname="client.test",
        timeout=30,
        start_tls=False,
    )
    await client.connect()
    await client.ehlo()
    await client.mail("alice@plain.test")
    await client.rcpt("bob@example.org")
    setup.relay.kill()  # the milter connection of this session dies with it
    try:
        with pytest.raises(aiosmtplib.SMTPResponseException) as info:
            await client.data(tricky("plain.test", 5))
        assert 400 <= info.value.code < 500, info.value
    finally:
        client.close()
    # A new session while the relay is down is tempfailed too.
    result = await send(
        setup.postfix.port,
        ["bob@example.org"],
        tricky("plain.test", 6),
        sender="alice@plain.test",
        client_ip=INTERNET,
    )
    assert 400 <= result.code < 500, result
    await setup.postfix.wait_queue_empty()
    assert not [m for m in setup.sink.messages if re.search(rb"<milter-[56]@", m.data)]
    setup.relay.start()  # back: mail flows again
    delivered = await _deliver(setup, "alice@plain.test", tricky("plain.test", 7), b"<milter-7@")
    assert delivered.count(b"Authentication-Results: relay.test;") == 1

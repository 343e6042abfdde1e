"""Before-queue placement: Postfix's smtpd_proxy_filter tells the relay the original client
with XFORWARD; relay control, facts and the Received field use it, and it is passed on."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.smtp.xforward import UNKNOWN_ADDR, client_address, parse_xforward
from tests.support.relay import RawClient, make_settings, running_relay, simple_message, sink_server


async def ehlo_lines(c: RawClient) -> list[str]:
    c.writer.write(b"EHLO proxy.test\r\n")
    lines = []
    while True:
        line = (await c.reader.readline()).decode().rstrip("\r\n")
        lines.append(line)
        if line[3] == " ":
            return lines


async def test_untrusted_clients_cannot_xforward(tmp_path: Path) -> None:
    async with running_relay(make_settings(tmp_path)) as relay:
        c = await RawClient.connect(relay.port)
        lines = await ehlo_lines(c)
        assert not any("XFORWARD" in line or "AUTH" in line for line in lines)
        assert (await c.cmd("XFORWARD ADDR=192.0.2.50")).startswith("550 5.7.0")
        assert (await c.cmd("AUTH PLAIN AGFAAGI=")).startswith("502")
        await c.close()


async def test_trusted_proxy_xforward_drives_relay_control_trace_and_downstream(
    tmp_path: Path,
) -> None:
    async with sink_server(xforward=True) as sink:
        settings = make_settings(
            tmp_path,
            {
                "smtp": {"xforward_hosts": ["127.0.0.0/8"]},
                "relay": {"networks": ["192.0.2.0/24"]},
                "delivery": {"mode": "smtp", "downstream": sink.address},
            },
        )
        async with running_relay(settings) as relay:
            c = await RawClient.connect(relay.port)
            assert any("XFORWARD" in line for line in await ehlo_lines(c))
            # Without XFORWARD the proxy's own address (127.0.0.1) may not relay out.
            await c.cmd("MAIL FROM:<alice@sender.test>")
            assert (await c.cmd("RCPT TO:<carol@elsewhere.test>")).startswith("550 5.7.1")
            assert (await c.cmd("RSET")).startswith("250")
            reply = await c.cmd("XFORWARD NAME=mx.remote.test ADDR=192.0.2.50 PORT=4242")
            assert reply.startswith("250")
            assert (await c.cmd("XFORWARD HELO=mx.remote.test PROTO=ESMTP")).startswith("250")
            await c.cmd("MAIL FROM:<alice@sender.test>")
            assert (await c.cmd("XFORWARD ADDR=192.0.2.51")).startswith("503")
            assert (await c.cmd("RCPT TO:<carol@elsewhere.test>")).startswith("250")
            await c.cmd("DATA")
            assert (await c.cmd(simple_message() + b".\r\n")).startswith("250")
            # The attributes lasted one transaction only.
            await c.cmd("MAIL FROM:<alice@sender.test>")
            assert (await c.cmd("RCPT TO:<carol@elsewhere.test>")).startswith("550 5.7.1")
            await c.close()
    (msg,) = sink.messages
    assert msg.data.startswith(b"Received: from mx.remote.test ([192.0.2.50])")
    assert any("ADDR=192.0.2.50" in x and "HELO=mx.remote.test" in x for x in sink.xforwards)
    assert not any("PORT=" in x for x in sink.xforwards)  # the sink did not offer PORT


@pytest.mark.parametrize(
    "arg", ["", "ADDR=not-an-ip", "BOGUS=1", "ADDR=1.2.3.4 " * 8, "HELO=a\x01b"]
)
def test_bad_xforward_is_refused(arg: str) -> None:
    with pytest.raises(ValueError):
        parse_xforward(arg)


def test_xforward_decoding() -> None:
    got = parse_xforward("NAME=[UNAVAILABLE] ADDR=IPv6:2001:DB8::1 HELO=a+2Bb IDENT=x")
    assert got == {"ADDR": "2001:db8::1", "HELO": "a+b", "IDENT": "x"}


def test_unavailable_addr_is_kept_as_unknown() -> None:
    for value in ("[UNAVAILABLE]", "[TEMPUNAVAIL]", ""):
        assert parse_xforward(f"ADDR={value} NAME=x") == {"ADDR": UNKNOWN_ADDR, "NAME": "x"}
    assert client_address(UNKNOWN_ADDR) == ""
    assert client_address("192.0.2.1") == "192.0.2.1"


@pytest.mark.parametrize("value", ["[UNAVAILABLE]", "[TEMPUNAVAIL]"])
async def test_unavailable_addr_never_judges_the_proxy(tmp_path: Path, value: str) -> None:
    """Issue 15: the proxy is trusted for XFORWARD and (overlapping) in [relay] networks; an
    unavailable ADDR must mean an unknown client, not the proxy, so no relaying out."""
    async with sink_server(xforward=True) as sink:
        settings = make_settings(
            tmp_path,
            {
                "smtp": {"xforward_hosts": ["127.0.0.0/8"]},
                "relay": {"networks": ["127.0.0.0/8"]},
                "delivery": {"mode": "smtp", "downstream": sink.address},
            },
        )
        async with running_relay(settings) as relay:
            c = await RawClient.connect(relay.port)
            await ehlo_lines(c)
            assert (await c.cmd(f"XFORWARD ADDR={value} HELO=mx.remote.test")).startswith("250")
            await c.cmd("MAIL FROM:<alice@sender.test>")
            assert (await c.cmd("RCPT TO:<carol@elsewhere.test>")).startswith("550 5.7.1")
            assert (await c.cmd("RCPT TO:<bob@example.org>")).startswith("250")
            await c.cmd("DATA")
            assert (await c.cmd(simple_message() + b".\r\n")).startswith("250")
            await c.close()
    (msg,) = sink.messages
    assert msg.rcpt_tos == ("bob@example.org",)
    assert msg.data.startswith(b"Received: from mx.remote.test\r\n")  # no address: unknown
    assert b"127.0.0.1" not in msg.data.split(b"\r\n\r\n", 1)[0]
    assert any("ADDR=[UNAVAILABLE]" in x for x in sink.xforwards)

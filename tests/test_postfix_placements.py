"""deploy/postfix/ against a real Postfix: both documented placements, end to end.

Each placement runs a private Postfix (tests/support/postfix.py) configured with the
shipped snippets, used verbatim but for these substitutions (nothing else is changed):

- ``127.0.0.1:2525`` / ``[127.0.0.1]:2525`` (the relay) and ``127.0.0.1:10026`` (the return
  smtpd) become free loopback ports; ``smtp      inet`` (the public smtpd, before the
  queue) becomes a loopback address with a free port;
- in relay.toml, the example network ``192.0.2.0/24`` (an office LAN in Postfix's
  mynetworks) becomes ``127.0.0.3/32``, the test's trusted client.

Postfix's main.cf is the harness's (loopback, no DNS, the sink as relayhost) with
``mynetworks = 127.0.0.1/32 127.0.0.3/32``; before the queue, ``relay_domains`` also has
example.net, a domain the relay does not serve. The before-queue instance has three more
copies of the snippet's public smtpd, each one change away from it and named by the test
that uses it: a 3 s proxy timeout (a stalled relay), a proxy to a relay started in-process
with other settings, and ``speed_adjust`` (why the snippet has none).

The relay is a real ``relay serve`` process on the shipped relay.toml (plus scratch paths
and a one-rule test policy), delivering to the return smtpd, which queues the mail for
an aiosmtpd sink (Postfix's relayhost). Clients connect from 127.0.0.2 (the Internet)
or 127.0.0.3 (Postfix's mynetworks). One Postfix and one relay per placement, shared
by the tests of the module.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from relay.app import Runtime, lifespan
from relay.secretkey import load_key
from tests.support.postfix import (
    DEPLOY_POSTFIX,
    Postfix,
    ThreadedSink,
    free_ports,
    postfix_or_skip,
    running_postfix,
    send,
    until,
)

# Moved to the harness; re-exported for tests/test_milter_postfix.py, which imports them
# from here (import them from tests.support.postfix instead).
from tests.support.postfix import main_cf_settings as main_cf_settings
from tests.support.postfix import snippet as snippet
from tests.support.relay import Received, make_settings, sink_server

RELAY_IN_SNIPPET = "127.0.0.1:2525"
RETURN_IN_SNIPPET = "127.0.0.1:10026"
PUBLIC_IN_SNIPPET = "smtp      inet"
LAN_IN_SNIPPET = "192.0.2.0/24"

INTERNET = "127.0.0.2"  # a client on the Internet: may only send to example.org
LAN = "127.0.0.3"  # a client in Postfix's mynetworks: may send anywhere
MYNETWORKS = f"127.0.0.1/32 {LAN}/32"

POLICY = """\
[policy]
name = "postfix-test"
mode = "enforce"

[[rule]]
name = "spam_sender"
when = 'mail_from_domain == "spam.test"'
action = "reject"
reason = "Refused by the test policy"
"""

pytestmark = pytest.mark.slow


def public_smtpd(master_cf: str) -> str:
    """The public smtpd entry (first line and its ``-o`` lines) of a master.cf text."""
    match = re.search(r"^127\.0\.0\.1:\d+ +inet .*smtpd\n(?:[ \t]+-o .*\n)*", master_cf, re.M)
    assert match, master_cf
    return match.group(0)


class RelayProcess:
    """``relay serve`` on a fixed port, which tests may stop, start, pause and resume."""

    def __init__(self, work: Path, config: Path, port: int) -> None:
        self.work = work
        self.config = config
        self.port = port
        self.log = work / "relay.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "relay.cli", "serve", "--config", str(self.config)],
                cwd=self.work,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,  # SIGSTOP/SIGCONT reach its helper processes too
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"relay exited early\n{self.log_tail()}"
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as conn:
                    if conn.recv(64).startswith(b"220"):
                        return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"relay did not start\n{self.log_tail()}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGCONT)  # a paused relay cannot handle SIGTERM
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def pause(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGCONT)

    def log_tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "relay log:\n" + "\n".join(text.splitlines()[-lines:])


def relay_config(work: Path, relay_port: int, return_port: int) -> Path:
    """deploy/postfix/relay.toml with its ports and example network substituted, plus the
    scratch paths and the test policy (sections the snippet leaves alone)."""
    (work / "policy.toml").write_text(POLICY)
    text = snippet(
        "relay.toml",
        {
            f'"{RELAY_IN_SNIPPET}"': f'"127.0.0.1:{relay_port}"',
            f'"{RETURN_IN_SNIPPET}"': f'"127.0.0.1:{return_port}"',
            LAN_IN_SNIPPET: f"{LAN}/32",
        },
    )
    text += f"""
[model]
enabled = false
[policy]
path = "{work / "policy.toml"}"
[metrics]
enabled = false
[auth]
enabled = false
[state]
path = "{work / "state.sqlite3"}"
[quarantine]
path = "{work / "quarantine"}"
[security]
key_file = "{work / "relay.key"}"
"""
    config = work / "relay.toml"
    config.write_text(text)
    load_key(work / "relay.key", create=True)
    return config


@dataclass
class Placement:
    postfix: Postfix
    sink: ThreadedSink
    relay: RelayProcess
    relay_port: int
    return_port: int
    stall_port: int = 0  # before the queue: the public smtpd with a short proxy timeout
    aux_port: int = 0  # before the queue: a public smtpd proxying to aux_relay_port
    aux_relay_port: int = 0
    speed_adjust_port: int = 0  # before the queue: the public smtpd with speed_adjust

    def why(self) -> str:
        return f"{self.postfix.log_tail()}\n{self.relay.log_tail()}"

    @contextlib.contextmanager
    def relay_down(self) -> Iterator[None]:
        self.relay.stop()
        try:
            yield
        finally:
            if self.relay.proc is None:
                self.relay.start()


@contextlib.contextmanager
def placement(name: str) -> Iterator[Placement]:
    postfix_or_skip()
    # every port at once, so no two are the same (free_ports)
    relay_port, return_port, public, stall, aux, aux_relay, speedy = free_ports(7)
    work = Path(tempfile.mkdtemp(prefix=f"relay-{name}-"))
    relay = RelayProcess(work, relay_config(work, relay_port, return_port), relay_port)
    ports = {
        RELAY_IN_SNIPPET: f"127.0.0.1:{relay_port}",
        RETURN_IN_SNIPPET: f"127.0.0.1:{return_port}",
    }
    try:
        with ThreadedSink() as sink:
            relay.start()
            if name == "after-queue":
                main = main_cf_settings(
                    snippet(
                        "after-queue.main.cf", {"[127.0.0.1]:2525": f"[127.0.0.1]:{relay_port}"}
                    )
                )
                master = snippet(
                    "after-queue.master.cf", {RETURN_IN_SNIPPET: ports[RETURN_IN_SNIPPET]}
                )
                with running_postfix(
                    name,
                    relayhost=sink.address,
                    main={"mynetworks": MYNETWORKS, **main},
                    master=master,
                ) as postfix:
                    yield Placement(postfix, sink, relay, relay_port, return_port)
            else:
                master = snippet(
                    "before-queue.master.cf",
                    {**ports, PUBLIC_IN_SNIPPET: f"127.0.0.1:{public} inet"},
                )
                # A second public smtpd, the snippet's own with a 3 s proxy timeout, for the
                # stalled-relay test (120 s would make it a two-minute test).
                short = public_smtpd(master).replace(f"127.0.0.1:{public} ", f"127.0.0.1:{stall} ")
                assert "smtpd_proxy_timeout=120s" in short
                master += "\n" + short.replace("smtpd_proxy_timeout=120s", "smtpd_proxy_timeout=3s")
                # A third, proxying to a relay a test starts in-process on aux_relay_port
                # with its own settings; its proxy timeout (6 s) is above that relay's
                # [delivery] timeout (2 s), the order before-queue.master.cf asks for.
                master += "\n" + (
                    public_smtpd(master)
                    .replace(f"127.0.0.1:{public} ", f"127.0.0.1:{aux} ")
                    .replace("smtpd_proxy_timeout=120s", "smtpd_proxy_timeout=6s")
                    .replace(ports[RELAY_IN_SNIPPET], f"127.0.0.1:{aux_relay}")
                )
                # A fourth: the snippet's own plus speed_adjust, which the guide used to
                # ship, to show what it does to a recipient the relay refuses.
                master += "\n" + (
                    public_smtpd(master).replace(f"127.0.0.1:{public} ", f"127.0.0.1:{speedy} ")
                    + "  -o smtpd_proxy_options=speed_adjust\n"
                )
                with running_postfix(
                    name,
                    relayhost=sink.address,
                    # example.net: Postfix accepts it, the relay does not (a recipient
                    # refused by the filter alone, test_before_queue_refuses_one_recipient).
                    main={"mynetworks": MYNETWORKS, "relay_domains": "example.org example.net"},
                    master=master,
                    port=public,
                    default_smtpd=False,
                ) as postfix:
                    yield Placement(
                        postfix, sink, relay, relay_port, return_port, stall, aux, aux_relay, speedy
                    )
    finally:
        relay.stop()
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def after_queue() -> Iterator[Placement]:
    with placement("after-queue") as p:
        yield p


@pytest.fixture(scope="module")
def before_queue() -> Iterator[Placement]:
    with placement("before-queue") as p:
        yield p


def message(subject: str, sender: str = "alice@sender.test", to: str = "bob@example.org") -> bytes:
    return (
        f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@sender.test>\r\n"
        "Date: Mon, 07 Dec 2026 10:00:00 +0000\r\n\r\nHello.\r\n"
    ).encode()


async def arrived(p: Placement, subject: str, seconds: float = 20) -> Received:
    needle = f"Subject: {subject}\r\n".encode()
    try:
        return await p.sink.wait_for_match(lambda m: needle in m.data, subject, seconds)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{p.why()}") from None


def relay_received(data: bytes) -> str:
    """The relay's own Received field (``by ... (relay)``), unfolded."""
    header = data.split(b"\r\n\r\n", 1)[0].decode()
    fields = re.split(r"\r\n(?=\S)", header)
    ours = [f for f in fields if f.startswith("Received:") and "(relay)" in f]
    assert len(ours) == 1, header
    return re.sub(r"\r\n\s+", " ", ours[0])


# --- the snippets in the guides are the files the tests run ------------------------------


@pytest.mark.parametrize(
    ("guide", "files"),
    [
        ("after-queue.md", ["after-queue.main.cf", "after-queue.master.cf", "relay.toml"]),
        ("before-queue.md", ["before-queue.master.cf", "relay.toml"]),
    ],
)
def test_guides_show_the_tested_files(guide: str, files: list[str]) -> None:
    text = (DEPLOY_POSTFIX / guide).read_text()
    for name in files:
        body = (DEPLOY_POSTFIX / name).read_text()
        assert f"```\n{body}```" in text or f"```toml\n{body}```" in text, (
            f"{guide} must show deploy/postfix/{name} verbatim"
        )


# --- normal mail ---------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["after_queue", "before_queue"])
async def test_mail_is_delivered_with_the_relays_headers_and_the_original_client(
    where: str, request: pytest.FixtureRequest
) -> None:
    p: Placement = request.getfixturevalue(where)
    result = await send(
        p.postfix.port, ["bob@example.org"], message(f"normal {where}"), client_ip=INTERNET
    )
    assert result.code == 250, f"{result}\n{p.why()}"
    got = await arrived(p, f"normal {where}")
    assert got.rcpt_tos == ("bob@example.org",)
    received = relay_received(got.data)
    # XFORWARD: the relay saw the Internet client's HELO and address, not Postfix's.
    assert received.startswith(f"Received: from client.sender.test ([{INTERNET}])"), received
    # ... and told the return smtpd, which logs the original client too.
    await p.postfix.wait_log(rf"client=\S+\[127\.0\.0\.1\].*orig_client=\S+\[{INTERNET}\]")


# --- the policy refuses --------------------------------------------------------------------


async def test_before_queue_policy_reject_is_a_5xx_in_the_session(before_queue: Placement) -> None:
    p = before_queue
    result = await send(
        p.postfix.port,
        ["bob@example.org"],
        message("rejected bq", "mallory@spam.test"),
        sender="mallory@spam.test",
        client_ip=INTERNET,
    )
    assert (result.code, result.stage) == (550, "data"), f"{result}\n{p.why()}"
    assert result.text == "5.7.1 Refused by the test policy"
    await p.postfix.wait_log(
        r"proxy-reject: END-OF-MESSAGE: 550 5\.7\.1 Refused by the test policy"
    )
    assert p.postfix.queue() == []  # nothing queued, nothing bounced: the sender was told
    assert not any(b"rejected bq" in m.data for m in p.sink.messages)


async def test_after_queue_policy_reject_becomes_a_bounce(after_queue: Placement) -> None:
    p = after_queue
    result = await send(
        p.postfix.port,
        ["bob@example.org"],
        message("rejected aq", "mallory@spam.test"),
        sender="mallory@spam.test",
        client_ip=INTERNET,
    )
    assert result.code == 250, result  # queued: the relay decides after the session
    qid = result.queue_id
    await p.postfix.wait_log(
        rf"{qid}: to=<bob@example.org>, relay=127\.0\.0\.1.*status=bounced .*"
        r"550 5\.7\.1 Refused by the test policy"
    )
    # The bounce goes to the envelope sender (backscatter when it is forged); Postfix's
    # own bounces do not pass the content filter again.
    bounce = await p.sink.wait_for_match(
        lambda m: m.mail_from == "<>" and m.rcpt_tos == ("mallory@spam.test",), "the bounce"
    )
    assert b"Refused by the test policy" in bounce.data
    assert not any(
        b"Subject: rejected aq" in m.data and m.rcpt_tos == ("bob@example.org",)
        for m in p.sink.messages
    )


# --- the relay is down or stalls -----------------------------------------------------------


async def test_before_queue_relay_down_is_a_4xx(before_queue: Placement) -> None:
    p = before_queue
    with p.relay_down():
        result = await send(
            p.postfix.port, ["bob@example.org"], message("relay down bq"), client_ip=INTERNET
        )
        # Postfix hides the cause from the client (451 4.3.0 queue file write error).
        assert 400 <= result.code < 500, f"{result}\n{p.why()}"
        await p.postfix.wait_log(
            rf"connect to proxy filter 127\.0\.0\.1:{p.relay_port}: Connection refused"
        )
    # Back up: the sender's retry goes through.
    result = await send(
        p.postfix.port, ["bob@example.org"], message("relay back bq"), client_ip=INTERNET
    )
    assert result.code == 250, f"{result}\n{p.why()}"
    await arrived(p, "relay back bq")


async def test_after_queue_relay_down_defers_and_loses_nothing(after_queue: Placement) -> None:
    p = after_queue
    with p.relay_down():
        result = await send(
            p.postfix.port, ["bob@example.org"], message("relay down aq"), client_ip=INTERNET
        )
        assert result.code == 250, result
        qid = result.queue_id
        await p.postfix.wait_log(rf"{qid}: to=<bob@example.org>, relay=none.*status=deferred")

        def mine() -> list[dict[str, Any]]:
            return [m for m in p.postfix.queue() if m["queue_id"] == qid]

        # qmgr logs "deferred" before it moves the file out of the active queue: wait for
        # the move rather than read the queue in between (a loaded run saw "active").
        await until(lambda: [m["queue_name"] for m in mine()] == ["deferred"], f"{qid} deferred")
        queued = mine()
        assert "Connection refused" in queued[0]["recipients"][0]["delay_reason"]
    p.postfix.flush()
    got = await arrived(p, "relay down aq")
    assert got.rcpt_tos == ("bob@example.org",)
    assert relay_received(got.data).startswith(f"Received: from client.sender.test ([{INTERNET}])")
    await p.postfix.wait_queue_empty()


async def test_before_queue_stalled_relay_is_a_4xx_within_the_proxy_timeout(
    before_queue: Placement,
) -> None:
    p = before_queue
    p.relay.pause()  # accepts connections (the kernel does), never answers
    try:
        started = time.monotonic()
        result = await send(
            p.stall_port, ["bob@example.org"], message("stalled bq"), client_ip=INTERNET
        )
        elapsed = time.monotonic() - started
    finally:
        p.relay.resume()
    assert 400 <= result.code < 500, f"{result}\n{p.why()}"
    assert 3 <= elapsed < 15, elapsed  # smtpd_proxy_timeout=3s on this listener
    await p.postfix.wait_log(rf"timeout talking to proxy 127\.0\.0\.1:{p.relay_port}")


# --- relay control ---------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["after_queue", "before_queue"])
async def test_internet_client_may_not_relay(where: str, request: pytest.FixtureRequest) -> None:
    p: Placement = request.getfixturevalue(where)
    result = await send(
        p.postfix.port, ["carol@other.test"], message(f"open relay {where}"), client_ip=INTERNET
    )
    assert (result.code, result.stage) == (554, "rcpt"), result
    assert "Relay access denied" in result.text


@pytest.mark.parametrize("where", ["after_queue", "before_queue"])
async def test_outbound_mail_from_mynetworks_is_relayed(
    where: str, request: pytest.FixtureRequest
) -> None:
    """The relay judges the original client (XFORWARD), so its networks must list
    Postfix's mynetworks (relay.toml), not Postfix's own 127.0.0.1."""
    p: Placement = request.getfixturevalue(where)
    result = await send(
        p.postfix.port,
        ["carol@other.test"],
        message(f"outbound {where}", to="carol@other.test"),
        helo="desktop.lan.test",
        client_ip=LAN,
    )
    assert result.code == 250, f"{result}\n{p.why()}"
    got = await arrived(p, f"outbound {where}")
    assert got.rcpt_tos == ("carol@other.test",)
    assert relay_received(got.data).startswith(f"Received: from desktop.lan.test ([{LAN}])")


async def test_after_queue_local_submission_is_relayed(after_queue: Placement) -> None:
    """sendmail on the Postfix host: Postfix sends no XFORWARD for such mail (there is no
    SMTP client to name), so the relay judges Postfix itself, 127.0.0.1, which the shipped
    networks list for this reason."""
    p = after_queue
    done = p.postfix.command(
        "sendmail",
        "-f",
        "cron@after-queue.postfix.test",
        "admin@other.test",
        input_text="Subject: local submission\n\nNightly report.\n",
    )
    assert done.returncode == 0, done.stderr
    got = await arrived(p, "local submission")
    assert got.rcpt_tos == ("admin@other.test",)
    assert "([127.0.0.1])" in relay_received(got.data)


async def test_before_queue_refuses_one_recipient_and_delivers_the_other(
    before_queue: Placement,
) -> None:
    """No speed_adjust: the relay's answer to each RCPT reaches the client, so a refused
    recipient costs only itself."""
    p = before_queue
    result = await send(
        p.postfix.port,
        ["bob@example.org", "eve@example.net"],
        message("one refused bq"),
        client_ip=INTERNET,
    )
    assert result.code == 250, f"{result}\n{p.why()}"
    assert [(r, code) for r, code, _ in result.refused] == [("eve@example.net", 550)], result
    got = await arrived(p, "one refused bq")
    assert got.rcpt_tos == ("bob@example.org",)


async def test_before_queue_with_speed_adjust_one_refused_recipient_fails_all(
    before_queue: Placement,
) -> None:
    """Why before-queue.master.cf has no speed_adjust: Postfix accepts both recipients
    itself, then the relay refuses one and the whole message fails, for bob too."""
    p = before_queue
    result = await send(
        p.speed_adjust_port,
        ["bob@example.org", "eve@example.net"],
        message("speed adjust bq"),
        client_ip=INTERNET,
    )
    assert (result.code, result.stage, result.refused) == (550, "data", ()), result
    await p.postfix.wait_log(
        r"proxy-reject: END-OF-MESSAGE: 550 5\.7\.1 Relaying denied; "
        r"from=<alice@sender\.test> to=<bob@example\.org>"
    )


# --- SMTPUTF8 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["after_queue", "before_queue"])
async def test_smtputf8_passes_through(where: str, request: pytest.FixtureRequest) -> None:
    p: Placement = request.getfixturevalue(where)
    sender = "jos\u00e9@sender.test"
    data = message(f"utf8 {where}", sender).replace(b"Hello.", "Gr\u00fc\u00dfe.".encode())
    result = await send(
        p.postfix.port,
        ["b\u00f6b@example.org"],
        data,
        sender=sender,
        mail_options=["SMTPUTF8"],
        client_ip=INTERNET,
    )
    assert result.code == 250, f"{result}\n{p.why()}"
    got = await arrived(p, f"utf8 {where}")
    assert (got.mail_from, got.rcpt_tos) == (sender, ("b\u00f6b@example.org",))
    assert "Grüße.".encode() in got.data


# --- relays with other settings behind the same Postfix (before the queue) --------------------


@contextlib.asynccontextmanager
async def relay_in_process(
    port: int, tmp: Path, overrides: dict[str, dict[str, object]]
) -> AsyncIterator[Runtime]:
    """The relay in this process on a fixed port (the aux listener's proxy filter)."""
    settings = make_settings(tmp, overrides)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(16)
    sock.setblocking(False)
    try:
        async with lifespan(settings, sock=sock) as runtime:
            yield runtime
    finally:
        sock.close()


async def test_before_queue_slow_downstream_gets_the_relays_own_4xx(
    before_queue: Placement, tmp_path: Path
) -> None:
    """[delivery] timeout below smtpd_proxy_timeout: when the relay's downstream stalls,
    the sender hears the relay's 451 (and retries), not Postfix's timeout."""
    p = before_queue
    async with sink_server(mode="hang") as stuck:
        overrides: dict[str, dict[str, object]] = {
            "smtp": {"xforward_hosts": ["127.0.0.1/32"]},
            "delivery": {"mode": "smtp", "downstream": stuck.address, "timeout": 2},
        }
        async with relay_in_process(p.aux_relay_port, tmp_path, overrides):
            started = time.monotonic()
            result = await send(
                p.aux_port, ["bob@example.org"], message("slow downstream"), client_ip=INTERNET
            )
            elapsed = time.monotonic() - started
    assert (result.code, result.stage) == (451, "data"), f"{result}\n{p.why()}"
    assert result.text == "4.4.2 Downstream timed out", result  # not Postfix's own 4.3.0
    assert 2 <= elapsed < 6, elapsed
    await p.postfix.wait_log(r"proxy-reject: END-OF-MESSAGE: 451 4\.4\.2 Downstream timed out")


async def test_before_queue_relay_networks_of_postfix_alone_refuse_outbound_mail(
    before_queue: Placement, tmp_path: Path
) -> None:
    """What the guides used to say (networks = ["127.0.0.1/32"]): with XFORWARD the relay
    judges the original client, so mail from Postfix's mynetworks is refused."""
    p = before_queue
    async with sink_server() as sink:
        overrides: dict[str, dict[str, object]] = {
            "smtp": {"xforward_hosts": ["127.0.0.1/32"]},
            "relay": {"domains": ["example.org"], "networks": ["127.0.0.1/32"]},
            "delivery": {"mode": "smtp", "downstream": sink.address},
        }
        async with relay_in_process(p.aux_relay_port, tmp_path, overrides):
            result = await send(
                p.aux_port,
                ["carol@other.test"],
                message("old networks", to="carol@other.test"),
                client_ip=LAN,
            )
    assert (result.code, result.stage) == (550, "rcpt"), f"{result}\n{p.why()}"
    assert sink.messages == []

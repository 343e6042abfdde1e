"""The policy over real SMTP: every action in enforce and shadow mode, and hot reload with
a good and a broken file while mail flows. Real relay, real downstream, loopback only."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import aiosmtplib
import pytest

from relay.config import Settings
from relay.contracts import NullObserver
from relay.delivery.quarantine import QuarantineStore
from relay.errors import ConfigError
from relay.secretkey import load_key
from tests.support.relay import (
    RawClient,
    Sink,
    free_port,
    make_settings,
    running_relay,
    send,
    simple_message,
    sink_server,
    wait_listening,
)

# Senders pick the outcome; T0/T1 facts only, so no DNS, model or state is needed.
POLICY = """
[policy]
name = "e2e"
mode = "{mode}"

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
name = "quarantine_me"
when = 'mail_from_domain == "quarantine.test"'
action = "quarantine"
reason = "quarantine sender"

[[rule]]
name = "reject_me"
when = 'mail_from_domain == "reject.test"'
action = "reject"
reason = "Sender domain refused by the e2e policy"

[[rule]]
name = "secret_scoring"
when = 'mail_from_domain == "reject.test" || mail_from_domain == "score.test"'
score = 16
reason = "SECRET internal heuristic"

[[rule]]
name = "tempfail_me"
when = 'mail_from_domain == "tempfail.test"'
action = "tempfail"
reason = "Greylisted by the e2e policy"
"""


async def until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Wait for ``condition`` itself, not for a time that usually suffices."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.05)


def settings_for(tmp_path: Path, sink: Sink, policy_text: str) -> Settings:
    path = tmp_path / "policy.toml"
    path.write_text(policy_text)
    return make_settings(
        tmp_path,
        {
            "policy": {"path": str(path)},
            "delivery": {"mode": "smtp", "downstream": sink.address},
        },
    )


async def attempt(port: int, sender: str) -> tuple[int, str]:
    """Send one message; the final reply code and text (refusals included)."""
    try:
        _, reply = await send(port, ["bob@example.org"], simple_message(sender=sender), sender)
    except aiosmtplib.SMTPResponseException as exc:
        return exc.code, exc.message
    return 250, reply


def header_block(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[0]


async def test_every_action_in_enforce_mode(tmp_path: Path) -> None:
    async with sink_server() as sink:
        settings = settings_for(tmp_path, sink, POLICY.format(mode="enforce"))
        async with running_relay(settings) as relay:
            accept = await attempt(relay.port, "a@plain.test")
            tag = await attempt(relay.port, "a@tag.test")
            quarantine = await attempt(relay.port, "a@quarantine.test")
            reject = await attempt(relay.port, "a@reject.test")
            threshold = await attempt(relay.port, "a@score.test")
            tempfail = await attempt(relay.port, "a@tempfail.test")

    assert accept[0] == 250 and tag[0] == 250 and quarantine[0] == 250
    assert reject == (550, "5.7.1 Sender domain refused by the e2e policy")
    assert "SECRET" not in threshold[1] and threshold[0] == 550
    assert threshold[1] == "5.7.1 Message rejected: spam score too high"
    assert tempfail == (451, "4.7.1 Greylisted by the e2e policy")

    # only accept and tag reach the downstream; tag carries the explanation headers
    assert [m.mail_from for m in sink.messages] == ["a@plain.test", "a@tag.test"]
    plain, tagged = (header_block(m.data) for m in sink.messages)
    assert b"X-Spam-" not in plain
    assert b"X-Spam-Score: 6.00" in tagged
    assert b"action=tag policy=e2e mode=enforce" in tagged
    assert b"X-Spam-Rules: tag_me=+6" in tagged

    # quarantine: the client got 250 with the entry id; the message is kept with its verdict
    store = QuarantineStore(tmp_path / "quarantine", key=load_key(settings.security.key_file))
    entries = (await store.list()).entries
    assert len(entries) == 1
    entry = entries[0]
    assert entry.id in quarantine[1]
    assert entry.mail_from == "a@quarantine.test" and entry.rcpt_to == ("bob@example.org",)
    assert entry.verdict["forced_by"] == "quarantine_me"
    _, raw = await store.show(entry.id)
    assert raw.endswith(simple_message(sender="a@quarantine.test"))


async def test_shadow_mode_delivers_everything_with_headers(tmp_path: Path) -> None:
    senders = [
        "a@plain.test",
        "a@tag.test",
        "a@quarantine.test",
        "a@reject.test",
        "a@tempfail.test",
    ]
    async with sink_server() as sink:
        settings = settings_for(tmp_path, sink, POLICY.format(mode="shadow"))
        async with running_relay(settings) as relay:
            replies = [await attempt(relay.port, s) for s in senders]
    assert [code for code, _ in replies] == [250] * len(senders)
    assert [m.mail_from for m in sink.messages] == senders
    actions = [b"accept", b"tag", b"quarantine", b"reject", b"tempfail"]
    for message, action in zip(sink.messages, actions, strict=True):
        head = header_block(message.data)
        assert b"action=" + action + b" policy=e2e mode=shadow" in head
    assert b"reject_me=reject" in header_block(sink.messages[3].data)
    listing = await QuarantineStore(
        tmp_path / "quarantine", key=load_key(settings.security.key_file)
    ).list()
    assert listing.entries == () and listing.refused == ()


class CountingObserver(NullObserver):
    def __init__(self) -> None:
        self.reloads: list[bool] = []

    def policy_reload(self, ok: bool) -> None:
        self.reloads.append(ok)


ACCEPT_ALL = """
[policy]
name = "open"
[[rule]]
name = "never"
when = "recipient_count > 1000"
action = "reject"
"""

REJECT_PLAIN = """
[policy]
name = "closed"
[[rule]]
name = "close_plain"
when = 'mail_from_domain == "plain.test"'
action = "reject"
reason = "Closed by the reloaded policy"
"""


async def test_reload_good_then_broken_file_while_mail_flows(tmp_path: Path) -> None:
    observer = CountingObserver()
    async with sink_server() as sink:
        settings = settings_for(tmp_path, sink, ACCEPT_ALL)
        policy_path = tmp_path / "policy.toml"
        async with running_relay(settings, observer) as relay:
            results: list[int] = []
            after_swap: list[int] = []  # messages whose session began after the swap
            stop, swapped = asyncio.Event(), asyncio.Event()

            async def traffic() -> None:
                while not stop.is_set():
                    late = swapped.is_set()
                    code, _ = await attempt(relay.port, "a@plain.test")
                    results.append(code)
                    if late:
                        after_swap.append(code)

            senders = [asyncio.create_task(traffic()) for _ in range(4)]
            await until(lambda: results.count(250) >= 4, "mail under the first policy")

            # a session that starts under the old policy finishes under it
            inflight = await RawClient.connect(relay.port)
            assert (await inflight.cmd("EHLO c.test")).startswith("250")
            assert (await inflight.cmd("MAIL FROM:<a@plain.test>")).startswith("250")

            policy_path.write_text(REJECT_PLAIN)
            assert relay.reload_policy()
            swapped.set()
            assert relay.pipeline.policy.current.name == "closed"

            assert (await inflight.cmd("RCPT TO:<bob@example.org>")).startswith("250")
            assert (await inflight.cmd("DATA")).startswith("354")
            body = simple_message(sender="a@plain.test") + b".\r\n"
            assert (await inflight.cmd(body)).startswith("250")
            await inflight.close()

            await until(lambda: len(after_swap) >= 4, "mail under the reloaded policy")
            policy_path.write_text(REJECT_PLAIN.replace("mail_from_domain", "mail_from_dom"))
            assert not relay.reload_policy()  # broken: the running policy stays
            assert relay.pipeline.policy.current.name == "closed"
            answered = len(after_swap)
            await until(lambda: len(after_swap) >= answered + 4, "mail after the failed reload")
            stop.set()
            await asyncio.gather(*senders)
            after = await attempt(relay.port, "a@plain.test")

    assert observer.reloads == [True, False]
    assert after == (550, "5.7.1 Closed by the reloaded policy")
    assert set(results) == {250, 550}, results  # both policies answered; no 4xx, no failure
    # every session begun after the swap (and after the failed reload) got the new policy
    assert after_swap and set(after_swap) == {550}
    # the in-flight message was delivered under the policy it started with
    delivered = sum(1 for m in sink.messages if m.mail_from == "a@plain.test")
    assert delivered == results.count(250) + 1


@pytest.mark.parametrize("mode", ["enforce", "shadow"])
async def test_missing_fact_does_not_break_mail(tmp_path: Path, mode: str) -> None:
    # sender_complaint_rate is a lab-only fact (its list exists only in the lab), missing
    # in a live relay by design: the fact fails, the rule is skipped, mail still flows
    policy = f"""
[policy]
name = "degraded"
mode = "{mode}"
[policy.thresholds]
tag = 1
[[rule]]
name = "complaints"
when = "sender_complaint_rate > 0.001"
action = "reject"
[[rule]]
name = "tag_all"
when = "recipient_count >= 1"
score = 2
"""
    async with sink_server() as sink:
        settings = settings_for(tmp_path, sink, policy)
        async with running_relay(settings) as relay:
            code, _ = await attempt(relay.port, "a@plain.test")
    assert code == 250
    assert len(sink.messages) == 1
    assert b"action=tag" in header_block(sink.messages[0].data)


READS_DMARC = """
[policy]
name = "needs-auth"
[[rule]]
name = "dmarc_fail"
when = 'dmarc == "fail"'
action = "reject"
"""


@pytest.mark.parametrize("where", ["policy", "shadow"])
async def test_a_policy_reading_a_fact_whose_service_is_off_stops_start_up(
    tmp_path: Path, where: str
) -> None:
    # dmarc needs the authenticator, and [auth] enabled = false (make_settings): the relay
    # refuses to start, naming the policy, the fact and the service, instead of finding
    # the service missing on every message.
    path = tmp_path / "needs-auth.toml"
    path.write_text(READS_DMARC)
    key = {"path": str(path)} if where == "policy" else {"path": "", "shadow": [str(path)]}
    settings = make_settings(tmp_path, {"policy": key})
    with pytest.raises(ConfigError, match=r"'dmarc' \(through 'auth_results'\).*authenticator"):
        async with running_relay(settings):
            pass


async def test_a_reload_to_a_policy_whose_service_is_off_keeps_the_old_one(
    tmp_path: Path,
) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(ACCEPT_ALL)
    async with running_relay(make_settings(tmp_path, {"policy": {"path": str(path)}})) as relay:
        before = relay.pipeline.policy.current
        path.write_text(READS_DMARC)
        assert relay.reload_policy() is False
        assert relay.pipeline.policy.current is before


async def test_sighup_from_relay_policy_reload_on_a_real_process(tmp_path: Path) -> None:
    port = free_port()
    policy = tmp_path / "policy.toml"
    policy.write_text(ACCEPT_ALL)
    cfg = tmp_path / "relay.toml"
    cfg.write_text(
        f"""
[smtp]
listen = "127.0.0.1:{port}"
hostname = "relay.test"
[relay]
domains = ["example.org"]
[delivery]
maildir = "{tmp_path / "maildir"}"
[model]
enabled = false
[policy]
path = "{policy}"
[metrics]
enabled = false
[auth]
enabled = false
[state]
path = "{tmp_path / "state.sqlite3"}"
[quarantine]
path = "{tmp_path / "quarantine"}"
"""
    )
    log_path = tmp_path / "relay.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    reload_cmd = [sys.executable, "-m", "relay.cli", "policy", "reload", "--config", str(cfg)]
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "relay.cli", "serve", "--config", str(cfg)],
            cwd=tmp_path,
            stderr=log_file,
            env=env,
        )
    try:
        await wait_listening(port, proc)
        assert (await attempt(port, "a@plain.test"))[0] == 250

        policy.write_text(REJECT_PLAIN)
        done = await asyncio.to_thread(
            subprocess.run, reload_cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert f"pid {proc.pid}" in done.stdout
        for _ in range(50):  # the signal is handled between messages, asynchronously
            if (await attempt(port, "a@plain.test"))[0] == 550:
                break
            await asyncio.sleep(0.1)
        assert await attempt(port, "a@plain.test") == (550, "5.7.1 Closed by the reloaded policy")

        # the command refuses to signal for a broken file; a raw SIGHUP keeps the old policy
        policy.write_text(REJECT_PLAIN.replace("mail_from_domain", "mail_from_dom"))
        done = await asyncio.to_thread(
            subprocess.run, reload_cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 1 and "unknown fact 'mail_from_dom'" in done.stderr
        proc.send_signal(signal.SIGHUP)
        await until(  # the relay's own word that it handled the signal
            lambda: b"policy reload failed, keeping closed" in log_path.read_bytes(),
            "the failed reload in relay.log",
        )
        assert proc.poll() is None
        assert (await attempt(port, "a@plain.test"))[0] == 550
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, 15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log = log_path.read_text()
    assert "policy reloaded" in log
    assert "policy reload failed" in log and "unknown fact 'mail_from_dom'" in log


REQUIRED_BULK = """
[policy]
name = "bulk-required"
mode = "enforce"
required = ["bulk_count"]

[policy.thresholds]
tag = 5

[[rule]]
name = "bulk"
when = "bulk_count > 50"
score = 6
reason = "bulk"
"""


@pytest.mark.parametrize("required", [True, False])
async def test_a_required_fact_down_defers_over_smtp(tmp_path: Path, required: bool) -> None:
    """The state backend is down (nothing listens on its port): a policy that requires
    bulk_count defers the message with 451 and delivers nothing; one that does not
    require it fails open and delivers, as documented."""
    text = REQUIRED_BULK if required else REQUIRED_BULK.replace('required = ["bulk_count"]\n', "")
    policy = tmp_path / "policy.toml"
    policy.write_text(text)
    settings = make_settings(
        tmp_path,
        {
            "policy": {"path": str(policy)},
            "state": {"backend": "redis", "url": f"redis://127.0.0.1:{free_port()}/0"},
        },
    )
    async with running_relay(settings) as relay:
        if required:
            with pytest.raises(aiosmtplib.SMTPDataError) as info:
                await send(relay.port, ["bob@example.org"], simple_message("deferred"))
            assert info.value.code == 451
            assert "requires is unavailable" in info.value.message
        else:
            await send(relay.port, ["bob@example.org"], simple_message("open"))
    delivered = list((tmp_path / "maildir" / "new").glob("*"))
    assert len(delivered) == (0 if required else 1)

"""The action table (pipeline/actions.py): one entry per Action, each carried out by
``Pipeline._act`` through its destination."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from relay.contracts import FactSource, MessageReport, NullObserver, Outcome
from relay.delivery.memory import MemoryTransport
from relay.facts import Services, default_registry
from relay.message import Envelope, Message, Peer
from relay.pipeline import actions
from relay.pipeline.actions import SHADOW, TABLE, Destination, Effect
from relay.pipeline.process import Pipeline
from relay.policy.holder import DeciderHolder
from relay.reply import Reply
from relay.verdict import Action, Mode, Verdict
from tests.support.relay import make_settings, running_relay, send, simple_message


def test_every_action_has_one_table_entry() -> None:
    # A new Action without its entry (headers, destination, reply, outcome) fails here.
    assert set(TABLE) == set(Action)


def test_an_entry_has_a_reply_exactly_when_it_refuses() -> None:
    for entry in (*TABLE.values(), SHADOW):
        assert (entry.reply is not None) == (entry.destination is Destination.NOWHERE)
    with pytest.raises(TypeError):
        Effect(actions.clean, Destination.NOWHERE, Outcome.REJECTED)
    with pytest.raises(TypeError):
        Effect(actions.clean, Destination.DELIVER, Outcome.DELIVERED, actions.reject_reply)


@pytest.mark.parametrize("action", list(Action))
def test_shadow_mode_delivers_with_headers_whatever_the_action(action: Action) -> None:
    verdict = Verdict(action=action, mode=Mode.SHADOW)
    assert actions.effect(verdict) is SHADOW
    assert actions.delivers(verdict)


def test_refusals_disclose_only_the_deciding_reason() -> None:
    reject = Verdict(action=Action.REJECT, reason="Bad\r\n  sender " + "x" * 300)
    reply = actions.effect(reject).reply
    assert reply is not None
    assert reply(reject) == Reply(550, "5.7.1", ("Bad sender " + "x" * 300)[:200])
    tempfail = Verdict(action=Action.TEMPFAIL)
    reply = actions.effect(tempfail).reply
    assert reply is not None
    assert reply(tempfail) == Reply(451, "4.7.1", "Try again later")


@dataclass
class _Decide:
    verdict: Verdict
    name: str = "fixed"
    fact_names: frozenset[str] = frozenset()

    async def decide(self, message: Message, facts: FactSource) -> Verdict:
        return self.verdict


@dataclass
class _Quarantine:
    kept: list[tuple[bytes, Verdict]] = field(default_factory=list)

    async def put(self, message: Message, verdict: Verdict) -> str:
        self.kept.append((message.raw, verdict))
        return "q1"


@dataclass
class _Reports(NullObserver):
    reports: list[MessageReport] = field(default_factory=list)

    def message_done(self, report: MessageReport) -> None:
        self.reports.append(report)


ROWS = [  # action, mode -> reply code, outcome, delivered, quarantined, X-Spam-* added
    (Action.ACCEPT, Mode.ENFORCE, 250, Outcome.DELIVERED, True, False, False),
    (Action.TAG, Mode.ENFORCE, 250, Outcome.DELIVERED, True, False, True),
    (Action.QUARANTINE, Mode.ENFORCE, 250, Outcome.QUARANTINED, False, True, False),
    (Action.REJECT, Mode.ENFORCE, 550, Outcome.REJECTED, False, False, False),
    (Action.TEMPFAIL, Mode.ENFORCE, 451, Outcome.TEMPFAILED, False, False, False),
    (Action.REJECT, Mode.SHADOW, 250, Outcome.DELIVERED, True, False, True),
]


def test_every_action_is_carried_out_below() -> None:
    assert {row[0] for row in ROWS if row[1] is Mode.ENFORCE} == set(Action)


@pytest.mark.parametrize(
    ("action", "mode", "code", "outcome", "delivered", "kept", "headers"), ROWS
)
async def test_the_pipeline_carries_out_each_entry(
    action: Action,
    mode: Mode,
    code: int,
    outcome: Outcome,
    delivered: bool,
    kept: bool,
    headers: bool,
) -> None:
    transport, quarantine, observer = MemoryTransport(), _Quarantine(), _Reports()
    pipeline = Pipeline(
        registry=default_registry(),
        services=Services(),
        policy=DeciderHolder(_Decide(Verdict(action=action, mode=mode, reason="why"))),
        quarantine=quarantine,
        observer=observer,
    )
    message = Message(
        b"X-Spam-Status: forged\r\nSubject: hi\r\n\r\nbody\r\n",
        Envelope("a@sender.test", ("b@example.org",)),
        Peer("192.0.2.7", helo="mx.sender.test"),
        received_at=1_795_000_000.0,
    )
    transaction = await transport.begin("a@sender.test")
    await transaction.add_recipient("b@example.org")
    reply = await pipeline.process(message, transaction)
    assert reply.code == code
    assert observer.reports[0].outcome is outcome
    assert bool(transport.delivered) is delivered
    assert bool(quarantine.kept) is kept
    for raw in [d[2] for d in transport.delivered] + [k[0] for k in quarantine.kept]:
        assert b"forged" not in raw  # the sender's X-Spam-* never passes
        assert (b"X-Spam-Status: action=" in raw) is headers


# What downstream filters, Sieve scripts and SpamAssassin-aware readers trust.
FORGED_SPAM = (
    b"X-Spam-Flag: YES\r\n"
    b"X-Spam-Level: *****\r\n"
    b"x-spam-level: ******\r\n"
    b"X-SPAM-Checker-Version: forged\r\n"
    b"X-Spam-Status: forged\r\n"
    b"X-Spam-Report:\r\n\tforged report\r\n"
)


@pytest.mark.parametrize("action", list(Action))
def test_every_sender_x_spam_field_is_removed(action: Action) -> None:
    """Issue 15, finding 2: not only the three fields we write, every X-Spam-* one."""
    raw = FORGED_SPAM + b"X-Spammy: kept\r\nSubject: hi\r\n\r\nX-Spam-Flag: YES\r\n"
    message = Message(
        raw,
        Envelope("a@sender.test", ("b@example.org",)),
        Peer("192.0.2.7"),
        received_at=1_795_000_000.0,
    )
    out = actions.stamp(message, Verdict(action=action, reason="why")).raw
    head, body = out.split(b"\r\n\r\n", 1)
    assert b"forged" not in head and b"X-Spam-Flag" not in head and b"*" not in head
    assert b"X-Spam-Level" not in head and b"x-spam-level" not in head
    assert head.endswith(b"X-Spammy: kept\r\nSubject: hi")  # the rest is untouched
    assert body == b"X-Spam-Flag: YES\r\n"  # the body is no header


E2E_POLICY = """
[policy]
name = "e2e"
mode = "{mode}"

[[rule]]
name = "tag_me"
when = 'mail_from_domain == "tag.test"'
action = "tag"
reason = "tag sender"

[[rule]]
name = "reject_me"
when = 'mail_from_domain == "reject.test"'
action = "reject"
reason = "reject sender"
"""


@pytest.mark.parametrize(
    ("mode", "sender", "ours"),
    [
        ("enforce", "a@plain.test", False),  # accept
        ("enforce", "a@tag.test", True),  # tag
        ("shadow", "a@reject.test", True),  # shadow: a reject delivered with our headers
    ],
)
async def test_forged_spam_verdicts_never_reach_the_mailbox(
    tmp_path: Path, mode: str, sender: str, ours: bool
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(E2E_POLICY.format(mode=mode))
    settings = make_settings(tmp_path, {"policy": {"path": str(policy)}})
    message = FORGED_SPAM + simple_message(sender=sender)
    async with running_relay(settings) as relay:
        await send(relay.port, ["bob@example.org"], message, sender=sender)
    (delivered,) = sorted((tmp_path / "maildir" / "new").glob("*"))
    data = delivered.read_bytes()
    head = data.split(b"\r\n\r\n", 1)[0]
    assert b"forged" not in data and b"*" not in head
    assert b"X-Spam-Flag" not in data and b"x-spam-level" not in head.lower()
    assert (b"X-Spam-Status: action=" in head) is ours
    assert data.endswith(simple_message(sender=sender))

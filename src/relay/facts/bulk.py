"""Facts that count across messages through the shared state: bulk, volume, correspondents.

- ``bulk_count`` (T2): how many distinct recipients got a near-identical body in the last
  24 hours. The decoded text is normalised (case, whitespace, digits, URL query strings),
  cut into 4-word shingles and MinHashed (12 hashes, 4 bands of 3); each band is hashed
  into a key, and the count is the largest number of distinct recipients seen under any of
  the message's band keys (locality-sensitive hashing: bodies with high shingle overlap
  share at least one band with high probability). Only hashes are stored, never text, and
  recipients are hashed too.
- ``sender_volume_24h`` (T1): messages x recipients sent in the last 24 hours by the
  sender's organisational domain (From, else envelope sender); ``bulk_sender`` (T1) stays
  true once a domain has reached 5,000 (Gmail's bulk status is permanent).
- ``known_correspondent`` (T1): every recipient has written to the sender before, as
  recorded by ``CorrespondentRecorder`` for mail relayed from ``[relay] networks``.

Counts include the message itself and only messages for which the fact was computed: a
policy that never asks for a fingerprint never hashes a body (docs/facts.md).
The clock is the message's ``received_at``, so the lab's time-ordered replay counts as the
live relay would.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import re
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from publicsuffixlist import PublicSuffixList

from relay.config import IPNetwork
from relay.contracts import FactSource
from relay.errors import FactError
from relay.facts.base import FactContext, FactSpec, FactType
from relay.facts.envelope import address_domain
from relay.facts.headers import from_address, header_recipients, org_domain
from relay.facts.text import BodyText
from relay.message import Message
from relay.state import StateStore, hashed
from relay.verdict import Tier, Verdict

BULK_WINDOW = 24 * 3600.0
VOLUME_WINDOW = 24 * 3600.0
BULK_SENDER_VOLUME = 5000  # Gmail: "close to 5,000 messages ... within 24 hours"
CORRESPONDENT_TTL = 365 * 24 * 3600.0
SHINGLE = 4
BANDS, ROWS = 4, 3
_PRIME = np.uint64(4294967311)  # smallest prime above 2**32: universal hashing mod p
_rng = np.random.default_rng(20121214)  # fixed: fingerprints must agree across processes
_A: npt.NDArray[np.uint64] = _rng.integers(1, 2**31, BANDS * ROWS, dtype=np.uint64)
_B: npt.NDArray[np.uint64] = _rng.integers(0, 2**31, BANDS * ROWS, dtype=np.uint64)
_A.setflags(write=False)
_B.setflags(write=False)
del _rng

_URL_QUERY = re.compile(r"((?:https?|ftp)://[^\s?#]*)[?#]\S*", re.IGNORECASE)
_DIGITS = re.compile(r"\d+")
_TOKEN = re.compile(r"\w+", re.UNICODE)


def normalise(text: str) -> list[str]:
    """Tokens of ``text`` with case, digit runs and URL query strings flattened."""
    text = _URL_QUERY.sub(r"\1", text.lower())
    return _TOKEN.findall(_DIGITS.sub("0", text))


def _shingle_hashes(tokens: Sequence[str]) -> npt.NDArray[np.uint64]:
    if len(tokens) <= SHINGLE:
        shingles = {" ".join(tokens)}
    else:
        shingles = {" ".join(tokens[i : i + SHINGLE]) for i in range(len(tokens) - SHINGLE + 1)}
    values = [
        int.from_bytes(hashlib.blake2b(s.encode(), digest_size=4).digest(), "big") for s in shingles
    ]
    return np.fromiter(values, dtype=np.uint64, count=len(values))


def fingerprint(text: str) -> tuple[str, ...]:
    """Band keys of ``text``: near-identical texts share at least one with high probability."""
    hashes = _shingle_hashes(normalise(text))
    # (a * h + b) mod p for every (hash function, shingle); a, h < 2**32 so no overflow.
    mins = ((_A[:, None] * hashes[None, :] + _B[:, None]) % _PRIME).min(axis=1)
    keys = []
    for band in range(BANDS):
        rows = mins[band * ROWS : (band + 1) * ROWS]
        keys.append(f"{band}:" + hashlib.blake2b(rows.tobytes(), digest_size=12).hexdigest())
    return tuple(keys)


def _message_key(message: Message) -> str:
    """Identity of one message across retries: its Message-ID, else its bytes."""
    msgid = (message.header("message-id") or "").strip()
    if msgid:
        return "id:" + msgid
    return "raw:" + hashlib.blake2b(message.raw, digest_size=16).hexdigest()


def _members(message: Message) -> list[str]:
    recipients = header_recipients(message)
    if not recipients:  # stored mail without envelope or To/Cc: count the message itself
        return [hashed("message", _message_key(message))]
    return [hashed("rcpt", r) for r in recipients]


async def _bulk_count(ctx: FactContext) -> int:
    body = await ctx.get("body_text")
    if not isinstance(body, BodyText):
        raise FactError("body_text is not available for fingerprinting")
    state = ctx.services.get(StateStore)
    members = _members(ctx.message)
    now = ctx.message.received_at
    # MinHash over every shingle: up to ~13 ms on large bodies, so off the event loop.
    keys = ["bulk:" + key for key in await asyncio.to_thread(fingerprint, body.text)]
    return max(await state.incr_windows(keys, members, BULK_WINDOW, now))


def _sender_org(ctx: FactContext) -> str:
    domain = address_domain(from_address(ctx.message)) or address_domain(
        ctx.message.envelope.mail_from
    )
    if not domain:
        raise FactError("no sender domain (no From address and a null envelope sender)")
    return org_domain(ctx.services.get(PublicSuffixList), domain)


async def _sender_volume_24h(ctx: FactContext) -> int:
    org = _sender_org(ctx)
    key = _message_key(ctx.message)
    members = [hashed(key, r) for r in header_recipients(ctx.message)] or [hashed(key)]
    state = ctx.services.get(StateStore)
    return await state.incr_window_many(
        "volume:" + org, members, VOLUME_WINDOW, ctx.message.received_at
    )


async def _bulk_sender(ctx: FactContext) -> bool:
    volume = await ctx.get("sender_volume_24h")
    state = ctx.services.get(StateStore)
    flag = "bulk_sender:" + _sender_org(ctx)
    now = ctx.message.received_at
    if volume >= BULK_SENDER_VOLUME:
        await state.add(flag, now=now)
        return True
    return await state.seen(flag, now=now)


def correspondent_key(writer: str, addressee: str) -> str:
    return "corr:" + hashed(writer.lower(), addressee.lower())


def _senders(message: Message) -> set[str]:
    found = {from_address(message), message.envelope.mail_from.lower()}
    return {s for s in found if "@" in s}


async def _known_correspondent(ctx: FactContext) -> bool:
    senders = _senders(ctx.message)
    recipients = header_recipients(ctx.message)
    if not senders or not recipients:
        return False
    state = ctx.services.get(StateStore)
    now = ctx.message.received_at
    for rcpt in recipients:
        known = False
        for sender in senders:
            if await state.seen(correspondent_key(rcpt, sender), now=now):
                known = True
                break
        if not known:
            return False
    return True


class CorrespondentRecorder:
    """A pipeline Stamp that learns who our users write to; it never changes the message.

    For every delivered message whose client is in ``networks`` (our own users, as in
    ``[relay] networks``), each (sender, recipient) pair is remembered for a year, for the
    From address and the envelope sender. ``known_correspondent`` on later inbound mail
    asks whether the recipient wrote to the sender.
    """

    def __init__(
        self,
        state: StateStore,
        networks: Sequence[IPNetwork],
        ttl: float = CORRESPONDENT_TTL,
    ) -> None:
        self.state = state
        self.networks = tuple(networks)
        self.ttl = ttl

    def outbound(self, message: Message) -> bool:
        try:
            ip = ipaddress.ip_address(message.peer.ip)
        except ValueError:
            return False
        return any(ip in net for net in self.networks)

    async def record(self, message: Message) -> int:
        """Remember the message's pairs if it is outbound; returns how many were stored."""
        if not self.outbound(message):
            return 0
        pairs = [(s, r) for s in _senders(message) for r in message.envelope.rcpt_to]
        for sender, rcpt in pairs:
            await self.state.add(correspondent_key(sender, rcpt), self.ttl, now=message.received_at)
        return len(pairs)

    async def __call__(self, message: Message, facts: FactSource, verdict: Verdict) -> Message:
        if verdict.delivers:
            await self.record(message)
        return message


FACTS = (
    FactSpec(
        "bulk_count",
        FactType.INT,
        Tier.FINGERPRINT,
        _bulk_count,
        depends=("body_text",),
        doc="distinct recipients of a near-identical body in 24 h (MinHash bands; hashes only)",
    ),
    FactSpec(
        "sender_volume_24h",
        FactType.INT,
        Tier.ENVELOPE,
        _sender_volume_24h,
        doc="messages x recipients from the sender's organisational domain in 24 h",
    ),
    FactSpec(
        "bulk_sender",
        FactType.BOOL,
        Tier.ENVELOPE,
        _bulk_sender,
        depends=("sender_volume_24h",),
        doc="the sender's organisational domain has ever reached 5,000 in 24 h (sticky)",
    ),
    FactSpec(
        "known_correspondent",
        FactType.BOOL,
        Tier.ENVELOPE,
        _known_correspondent,
        doc="every recipient has written to the sender before (learned from outbound mail)",
    ),
)

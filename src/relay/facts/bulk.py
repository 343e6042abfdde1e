"""Facts that count across messages through the shared state: bulk, volume, correspondents.

- ``bulk_count`` (T2): how many distinct recipients got a near-identical body in the last
  24 hours. The decoded text is normalised (case, whitespace, digits, URL query strings),
  cut into 4-word shingles and MinHashed (12 hashes, 4 bands of 3; classifier/minhash.py,
  run by the classifier's children when there are any); each band is hashed into a key,
  and the count is the largest number of distinct recipients seen under any of
  the message's band keys (locality-sensitive hashing: bodies with high shingle overlap
  share at least one band with high probability). Only hashes are stored, never text, and
  recipients are hashed too (keyed: ``StateStore.hashed``).
- ``sender_volume_24h`` (T1): messages x recipients sent in the last 24 hours by the
  sender's organisational domain (From, else envelope sender); ``bulk_sender`` (T1) stays
  true once a domain has reached 5,000 (Gmail's bulk status is permanent).
- ``known_correspondent`` (T1): every recipient has written to the sender before, as
  recorded for mail from ``[relay] networks`` that was delivered.

These facts only read the state: a count is what the store holds plus this message, as if
it had been recorded already (so a message counts itself, once). The writes are made by
the pipeline's recorder (``pipeline/recorder.py``) after the action, for every message,
with the keys and members the helpers below define, so reading and recording cannot drift.
The clock is the message's ``received_at``, so the lab's time-ordered replay counts as the
live relay would.
"""

from __future__ import annotations

import asyncio
import hashlib

from publicsuffixlist import PublicSuffixList

from relay.auth.domains import org_domain
from relay.classifier.minhash import fingerprint
from relay.errors import FactError
from relay.facts.base import FactContext, FactSpec, FactType
from relay.facts.envelope import address_domain
from relay.facts.headers import from_address, header_recipients
from relay.facts.services import FINGERPRINTER, PSL, STATE, Fingerprinter
from relay.facts.text import BodyText
from relay.message import Message
from relay.state import StateStore
from relay.verdict import Tier

BULK_WINDOW = 24 * 3600.0
VOLUME_WINDOW = 24 * 3600.0
BULK_SENDER_VOLUME = 5000  # Gmail: "close to 5,000 messages ... within 24 hours"
CORRESPONDENT_TTL = 365 * 24 * 3600.0


def _message_key(message: Message) -> str:
    """Identity of one message across retries: its Message-ID, else its bytes."""
    msgid = (message.header("message-id") or "").strip()
    if msgid:
        return "id:" + msgid
    return "raw:" + hashlib.blake2b(message.raw, digest_size=16).hexdigest()


def bulk_members(state: StateStore, message: Message) -> list[str]:
    """Who a fingerprint is counted for: the hashed recipients (else the message)."""
    recipients = header_recipients(message)
    if not recipients:  # stored mail without envelope or To/Cc: count the message itself
        return [state.hashed("message", _message_key(message))]
    return [state.hashed("rcpt", r) for r in recipients]


async def bulk_keys(body: object, children: Fingerprinter | None = None) -> list[str]:
    """The state keys of a body's fingerprint bands (``body`` is ``body_text``'s value).
    ``children``: the classifier's children, which compute them (a relay worker then never
    loads numpy); None (model disabled, the lab, ``relay scan``): computed here, by the
    same function (classifier/minhash.py), so the keys are the same either way."""
    if not isinstance(body, BodyText):
        raise FactError("body_text is not available for fingerprinting")
    if children is not None:
        keys = await children.fingerprint(body.text)
    else:
        # MinHash over every shingle: up to ~13 ms on large bodies, so off the event loop.
        keys = await asyncio.to_thread(fingerprint, body.text)
    return ["bulk:" + key for key in keys]


async def _bulk_fingerprint(ctx: FactContext) -> list[str]:
    return await bulk_keys(await ctx.get("body_text"), ctx.service(FINGERPRINTER))


async def _bulk_count(ctx: FactContext) -> int:
    state = ctx.service(STATE)  # before hashing: the lab's first pass has none
    keys = await ctx.get("bulk_fingerprint")
    members = bulk_members(state, ctx.message)
    return max(await state.count_windows(keys, members, BULK_WINDOW, ctx.message.received_at))


def sender_org(message: Message, psl: PublicSuffixList) -> str:
    """Organisational domain of the From address, else of the envelope sender."""
    domain = address_domain(from_address(message)) or address_domain(message.envelope.mail_from)
    if not domain:
        raise FactError("no sender domain (no From address and a null envelope sender)")
    return org_domain(psl, domain)


def volume_key(org: str) -> str:
    return "volume:" + org


def volume_members(state: StateStore, message: Message) -> list[str]:
    """(message, recipient) pairs, hashed: a retried message counts once."""
    key = _message_key(message)
    return [state.hashed(key, r) for r in header_recipients(message)] or [state.hashed(key)]


def bulk_sender_flag(org: str) -> str:
    return "bulk_sender:" + org


async def _sender_volume_24h(ctx: FactContext) -> int:
    org = sender_org(ctx.message, ctx.service(PSL))
    state = ctx.service(STATE)
    return await state.count_window_many(
        volume_key(org), volume_members(state, ctx.message), VOLUME_WINDOW, ctx.message.received_at
    )


async def _bulk_sender(ctx: FactContext) -> bool:
    volume = await ctx.get("sender_volume_24h")
    if volume >= BULK_SENDER_VOLUME:  # the recorder sets the flag when it records this one
        return True
    org = sender_org(ctx.message, ctx.service(PSL))
    state = ctx.service(STATE)
    return await state.seen(bulk_sender_flag(org), now=ctx.message.received_at)


def correspondent_key(state: StateStore, writer: str, addressee: str) -> str:
    return "corr:" + state.hashed(writer.lower(), addressee.lower())


def senders(message: Message) -> set[str]:
    """The From address and the envelope sender (lower-cased), where they are addresses."""
    found = {from_address(message), message.envelope.mail_from.lower()}
    return {s for s in found if "@" in s}


async def _known_correspondent(ctx: FactContext) -> bool:
    writers = senders(ctx.message)
    recipients = header_recipients(ctx.message)
    if not writers or not recipients:
        return False
    state = ctx.service(STATE)
    now = ctx.message.received_at
    for rcpt in recipients:
        known = False
        for sender in writers:
            if await state.seen(correspondent_key(state, rcpt, sender), now=now):
                known = True
                break
        if not known:
            return False
    return True


FACTS = (
    FactSpec(
        "bulk_fingerprint",
        FactType.STR_LIST,
        Tier.FINGERPRINT,
        _bulk_fingerprint,
        depends=("body_text",),
        needs=(FINGERPRINTER,),
        doc="internal: the state keys of the body's MinHash bands (hashes only), computed "
        "once for bulk_count and the recorder",
    ),
    FactSpec(
        "bulk_count",
        FactType.INT,
        Tier.FINGERPRINT,
        _bulk_count,
        depends=("bulk_fingerprint",),
        needs=(STATE,),
        doc="distinct recipients of a near-identical body in 24 h (MinHash bands; hashes only)",
    ),
    FactSpec(
        "sender_volume_24h",
        FactType.INT,
        Tier.ENVELOPE,
        _sender_volume_24h,
        needs=(PSL, STATE),
        doc="messages x recipients from the sender's organisational domain in 24 h",
    ),
    FactSpec(
        "bulk_sender",
        FactType.BOOL,
        Tier.ENVELOPE,
        _bulk_sender,
        depends=("sender_volume_24h",),
        needs=(PSL, STATE),
        doc="the sender's organisational domain has ever reached 5,000 in 24 h (sticky)",
    ),
    FactSpec(
        "known_correspondent",
        FactType.BOOL,
        Tier.ENVELOPE,
        _known_correspondent,
        needs=(STATE,),
        doc="every recipient has written to the sender before (learned from outbound mail)",
    ),
)

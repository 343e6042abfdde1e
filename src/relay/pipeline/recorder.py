"""The one writer of shared state: after the action, once per message.

Facts only read (``facts/bulk.py``, ``facts/network.py``): a state-backed fact is the
count the store holds plus this message, as if it were recorded already. ``Recorder``
makes the records, with the same keys and members the facts read, after the action has
run, whatever the policy read. So a policy that stops on a connection fact leaves the
same counts behind as one that reads every fact, and ``relay scan`` (no recorder, a
read-only store) changes nothing.

What each outcome records:

    record                 read by                          recorded for
    body fingerprint       bulk_count                       every message: what arrived
    (band keys x rcpts)
    (message, rcpt) under  sender_volume_24h, bulk_sender   every message: what arrived
    the sender's org                                        (+ the sticky bulk_sender flag
                                                            once the count reaches 5,000)
    connection (ip, port)  connection_rate                  every message: what arrived
    (sender, rcpt) pairs   known_correspondent              Outcome.DELIVERED from a client
                                                            in ``[relay] networks`` only
    greylist triplets      greylist, greylist_wait          every message whose greylist
    (+ passes per network)                                  is new, early or passed
    token buckets          rate_*_wait, rate_limit_wait     every message: a token from
                                                            each bucket that holds one

Which records a message gets is fixed by the loaded policies (``Pipeline`` passes the
records their rules can read, dependencies included), never by how far evaluation went;
a relay whose policies read no state-backed fact records nothing and decodes no body.

Greylisting and rate limits are decisions made at the end of DATA, yet their writes
wait for the recorder too: the fact that said "new" or "a token is left" never changes the
store, so ``relay scan``, the lab and shadow regimes cannot greylist or spend tokens, and
what is recorded never depends on how far a policy got. The price is a window between
read and write: messages in flight together may all see the last token (the take itself
is atomic, so a bucket never goes below empty and is never overdrawn by more than those
messages), and two first attempts of one triplet both see "new" (the first one recorded
stays the first sight).

The counts measure what reached the relay, so rejected, quarantined, tempfailed and failed
messages count too (a campaign we refuse is still a campaign). Correspondents are what our
own users actually wrote to, so only mail that was delivered teaches them.

The recorder reads what it needs through the message's own Facts (``bulk_fingerprint``:
hashed once, shared with ``bulk_count``), after the Verdict was built, so it never changes
a decision. Each record is independent; a message without the input (no
sender domain, an undecodable body) skips that record, and a failure is logged with the
queue id and the reason (never the body) and never changes the client's reply.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Awaitable, Collection, Sequence
from enum import StrEnum

from publicsuffixlist import PublicSuffixList

from relay.config import GreylistSettings, IPNetwork, RateLimitSettings
from relay.contracts import FactSource, Outcome
from relay.errors import FactError
from relay.facts import bulk, greylist, network, ratelimit
from relay.loglimit import LogLimiter
from relay.message import Message
from relay.state import StateStore
from relay.verdict import Verdict

log = logging.getLogger("relay.recorder")


class Record(StrEnum):
    """The kinds of record; the lab records only those its regimes' facts read."""

    BULK = "bulk"
    VOLUME = "volume"
    CONNECTION = "connection"
    CORRESPONDENTS = "correspondents"
    GREYLIST = "greylist"
    RATE = "rate"


# Which facts read each record (the lab picks the records from the facts it computes).
READ_BY: dict[Record, frozenset[str]] = {
    Record.BULK: frozenset({"bulk_count"}),
    Record.VOLUME: frozenset({"sender_volume_24h", "bulk_sender"}),
    Record.CONNECTION: frozenset({"connection_rate"}),
    Record.CORRESPONDENTS: frozenset({"known_correspondent"}),
    Record.GREYLIST: frozenset({"greylist_check"}),
    Record.RATE: frozenset(
        {"rate_client_ip_wait", "rate_sender_domain_wait", "rate_recipient_wait"}
    ),
}
ALL = frozenset(Record)


def records_for(names: Collection[str]) -> frozenset[Record]:
    """The records the facts ``names`` read."""
    return frozenset(r for r, readers in READ_BY.items() if readers & set(names))


class Recorder:
    """Writes every record of one message to the shared state (see the module doc)."""

    def __init__(
        self,
        state: StateStore,
        psl: PublicSuffixList,
        networks: Sequence[IPNetwork] = (),
        *,
        records: Collection[Record] = ALL,
        correspondent_ttl: float = bulk.CORRESPONDENT_TTL,
        greylist: GreylistSettings | None = None,
        ratelimit: RateLimitSettings | None = None,
    ) -> None:
        self.state = state
        self.psl = psl
        self.networks = tuple(networks)
        self.records = frozenset(records)
        self.correspondent_ttl = correspondent_ttl
        self.greylist = greylist  # None: nothing to record (the lab has no greylisting)
        self.ratelimit = ratelimit
        self._logs = LogLimiter()  # record failures: one line per kind a minute

    async def record(
        self,
        message: Message,
        facts: FactSource,
        verdict: Verdict,
        outcome: Outcome,
        only: Collection[Record] = ALL,
    ) -> None:
        """Record ``message`` (as it arrived: the one its facts were computed on) after
        its action ended in ``outcome``; ``only`` narrows the records to those some loaded
        policy can read. Never raises."""
        wanted = self.records.intersection(only)
        steps: list[tuple[Record, Awaitable[None]]] = []
        if Record.BULK in wanted:
            steps.append((Record.BULK, self._bulk(message, facts)))
        if Record.VOLUME in wanted:
            steps.append((Record.VOLUME, self._volume(message)))
        if Record.CONNECTION in wanted:
            steps.append((Record.CONNECTION, self._connection(message)))
        if Record.CORRESPONDENTS in wanted and self._ours_delivered(message, outcome):
            steps.append((Record.CORRESPONDENTS, self._correspondents(message)))
        if Record.GREYLIST in wanted and self.greylist is not None:
            steps.append((Record.GREYLIST, self._greylist(message, facts, self.greylist)))
        if Record.RATE in wanted and self.ratelimit is not None:
            steps.append((Record.RATE, self._rate(message, self.ratelimit)))
        results = await asyncio.gather(*(step for _, step in steps), return_exceptions=True)
        for (kind, _), result in zip(steps, results, strict=True):
            if isinstance(result, FactError):  # the message lacks the input: nothing to count
                log.debug("queue_id=%s record=%s skipped: %s", message.queue_id, kind, result)
            elif isinstance(result, Exception):
                # An outage fails every message alike: one line per record kind a minute.
                held = self._logs.allow(kind)
                if held is not None:
                    log.warning(
                        "queue_id=%s record=%s failed: %s: %s (%d more since the last line)",
                        message.queue_id,
                        kind,
                        type(result).__name__,
                        result,
                        held,
                    )
            elif isinstance(result, BaseException):  # cancellation: the session is going
                raise result

    async def _bulk(self, message: Message, facts: FactSource) -> None:
        keys = await facts.get("bulk_fingerprint")  # hashed once, shared with bulk_count
        members = bulk.bulk_members(self.state, message)
        await self.state.incr_windows(keys, members, bulk.BULK_WINDOW, message.received_at)

    async def _volume(self, message: Message) -> None:
        org = bulk.sender_org(message, self.psl)
        now = message.received_at
        volume = await self.state.incr_window_many(
            bulk.volume_key(org), bulk.volume_members(self.state, message), bulk.VOLUME_WINDOW, now
        )
        if volume >= bulk.BULK_SENDER_VOLUME:
            await self.state.add(bulk.bulk_sender_flag(org), now=now)

    async def _connection(self, message: Message) -> None:
        peer = message.peer
        if not peer.ip:  # unknown client: counted under no address
            return
        await self.state.incr_window(
            network.connection_key(self.state, peer),
            network.connection_member(self.state, peer),
            network.RATE_WINDOW,
            message.received_at,
        )

    def _ours_delivered(self, message: Message, outcome: Outcome) -> bool:
        if outcome is not Outcome.DELIVERED or not self.networks:
            return False
        try:
            ip = ipaddress.ip_address(message.peer.ip)
        except ValueError:
            return False
        return any(ip in net for net in self.networks)

    async def _correspondents(self, message: Message) -> None:
        """Our user wrote to each recipient: remember (sender, recipient) for a year."""
        now = message.received_at
        for sender in bulk.senders(message):
            for rcpt in message.envelope.rcpt_to:
                key = bulk.correspondent_key(self.state, sender, rcpt)
                await self.state.add(key, self.correspondent_ttl, now=now)

    async def _greylist(
        self, message: Message, facts: FactSource, settings: GreylistSettings
    ) -> None:
        """Move the message's triplets on (first sight, pass, refresh: state.greylist_step)
        and count the triplets that passed from the client network (auto-allow). Off or
        exempt mail records nothing; the fact's own value says which (read once)."""
        check = await facts.get("greylist_check")
        if check["status"] not in (greylist.NEW, greylist.EARLY, greylist.PASSED):
            return
        keys = greylist.triplet_keys(self.state, message, settings)
        now = message.received_at
        entries = await self.state.grey_record(
            keys,
            now,
            delay=settings.delay,
            retry_window=settings.retry_window,
            lifetime=settings.lifetime,
        )
        passed = [key for key, entry in zip(keys, entries, strict=True) if entry.passed]
        if passed and settings.auto_allow_after:
            await self.state.incr_window_many(
                greylist.network_key(self.state, message, settings),
                passed,
                settings.lifetime,
                now,
            )

    async def _rate(self, message: Message, settings: RateLimitSettings) -> None:
        """One token from each of the message's buckets that holds one (all in one
        transaction); a bucket that had none is left as it is."""
        found = [
            bucket
            for kind in ratelimit.KINDS
            for bucket in ratelimit.buckets(kind, self.state, message, settings, self.psl)
        ]
        if found:
            await self.state.bucket_take(found, message.received_at)

"""One pass over one message: facts -> verdict -> stamps -> action -> record -> reply.

smtp.py calls ``Pipeline.process`` once per DATA and knows nothing of policies, facts or
headers; ``relay scan``, the lab and quarantine release reuse the same pieces. The seams:

- Decider: ``decide(message, facts) -> Verdict`` (the policy engine; NOOP accepts all).
- Stamp:   rewrites the message's header block after the decision (Authentication-Results,
           spam score headers); prepends to the raw bytes, never re-serialises.
- Observer: metrics and logs watch SMTP events and finished messages.
- Quarantine: stores the exact raw message with its Verdict.
- Recorder: after the action, the one write of shared state per message (counts, pairs).
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from relay.contracts import (
    Decider,
    MessageReport,
    NullObserver,
    Observer,
    Outcome,
    Quarantine,
    Stamp,
    Transaction,
)
from relay.errors import DeliveryError, PermanentDeliveryError
from relay.facts.base import FactFailures, FactRegistry, Facts, Services
from relay.message import Message
from relay.models.holder import ClassifierHolder
from relay.pipeline import actions
from relay.pipeline.actions import Destination, Effect
from relay.pipeline.recorder import Record, Recorder, records_for
from relay.policy.holder import DeciderHolder
from relay.reply import INTERNAL_ERROR, Reply
from relay.verdict import ACCEPT_ALL, Verdict

log = logging.getLogger("relay.message")


@dataclass
class Pipeline:
    registry: FactRegistry
    services: Services
    policy: DeciderHolder
    stamps: Sequence[Stamp] = ()
    quarantine: Quarantine | None = None
    observer: Observer = field(default_factory=NullObserver)
    shadow: Sequence[Decider] = ()
    hostname: str = "relay.localhost"
    recorder: Recorder | None = None  # the one writer of shared state (pipeline/recorder.py)
    # Told of every failed fact (ops/faults.py: counted, logged, /readyz degraded).
    failures: FactFailures | None = None
    # The classifier in force, swapped on reload; each message pins the one current when
    # it starts, so it finishes on that model (models/holder.py). None: services' own.
    classifiers: ClassifierHolder | None = None
    _records_cache: dict[tuple[int, ...], frozenset[Record]] = field(
        default_factory=dict, init=False, repr=False
    )

    async def process(
        self,
        message: Message,
        transaction: Transaction,
        decider: Decider | None = None,
        *,
        trace: bool = True,
    ) -> Reply:
        """Decide, act and deliver; returns the reply for the client. Never raises.

        ``trace``: add our Received field. The milter door says False: there the MTA is
        the hop and writes its own; ours would sit above it and name a hop that was none.
        """
        if self.classifiers is None:
            return await self._process(message, transaction, decider, self.services, trace)
        classifier = self.classifiers.pin()
        try:
            services = self.services
            if classifier is not services.classifier:
                services = dataclasses.replace(services, classifier=classifier)
            return await self._process(message, transaction, decider, services, trace)
        finally:
            self.classifiers.unpin(classifier)

    async def _process(
        self,
        message: Message,
        transaction: Transaction,
        decider: Decider | None,
        services: Services,
        trace: bool = True,
    ) -> Reply:
        start = time.perf_counter()
        timings: list[tuple[str, float]] = []
        decider = decider or self.policy.current
        facts = Facts(self.registry, message, services, failures=self.failures)
        verdict = ACCEPT_ALL
        shadow: tuple[Verdict, ...] = ()
        delivery = "none"
        try:
            verdict = await decider.decide(message, facts)
            timings.append(("decide", time.perf_counter() - start))
            shadow = await self._shadow(message, facts)
            t = time.perf_counter()
            for stamp in self.stamps:
                message = await stamp(message, facts, verdict)
            message = actions.stamp(message, verdict)
            if trace:
                message = message.with_prepended([("Received", received(message, self.hostname))])
            timings.append(("stamp", time.perf_counter() - t))
            t = time.perf_counter()
            reply, outcome, delivery = await self._act(message, transaction, verdict)
            timings.append(("act", time.perf_counter() - t))
        except Exception:  # a bug must cost a retry, never a lost or half-delivered message
            log.exception("queue_id=%s pipeline failure", message.queue_id)
            await transaction.abort()
            reply, outcome = INTERNAL_ERROR, Outcome.FAILED
        records = self._records(decider)
        if self.recorder is not None and records:  # once per message, whatever it read
            t = time.perf_counter()
            await self.recorder.record(facts.message, facts, verdict, outcome, records)
            timings.append(("record", time.perf_counter() - t))
        timings.append(("total", time.perf_counter() - start))
        report = MessageReport(
            queue_id=message.queue_id,
            size=message.size,
            recipients=len(message.envelope.rcpt_to),
            verdict=verdict,
            reply=reply,
            outcome=outcome,
            timings=tuple(timings),
            delivery=delivery,
            shadow=shadow,
        )
        _log_report(report)
        self.observer.message_done(report)
        return reply

    def _records(self, decider: Decider) -> frozenset[Record]:
        """The records the loaded policies (this one and the shadows) can read, directly or
        through dependencies: fixed per policy, never by how far evaluation got, so counts
        do not depend on where a policy stopped; a relay whose policies read no counts
        pays nothing (a bulk record decodes and hashes the body)."""
        key = (id(decider), *(id(d) for d in self.shadow))
        found = self._records_cache.get(key)
        if found is None:
            names = decider.fact_names.union(*(d.fact_names for d in self.shadow))
            found = records_for(self.registry.closure(names))
            if len(self._records_cache) > 16:  # a reload leaves the old policy's entry
                self._records_cache.clear()
            self._records_cache[key] = found
        return found

    async def _shadow(self, message: Message, facts: Facts) -> tuple[Verdict, ...]:
        if not self.shadow:
            return ()
        verdicts = await asyncio.gather(*(d.decide(message, facts) for d in self.shadow))
        for v in verdicts:
            self.observer.shadow_verdict(v)
        return tuple(verdicts)

    async def _act(
        self, message: Message, transaction: Transaction, verdict: Verdict
    ) -> tuple[Reply, Outcome, str]:
        """Looks the verdict up in the action table and calls its destination."""
        effect = actions.effect(verdict)
        if effect.destination is Destination.DELIVER:
            return await self._deliver(message, transaction, effect)
        await transaction.abort()
        if effect.destination is Destination.QUARANTINE:
            return await self._quarantine(message, verdict, effect)
        assert effect.reply is not None  # Effect checks: NOWHERE entries carry a reply
        return effect.reply(verdict), effect.outcome, "none"

    async def _deliver(
        self, message: Message, transaction: Transaction, effect: Effect
    ) -> tuple[Reply, Outcome, str]:
        try:
            return await transaction.send(message), effect.outcome, "ok"
        except DeliveryError as exc:
            kind = "permanent" if isinstance(exc, PermanentDeliveryError) else "temporary"
            return Reply(exc.code, exc.status, exc.text), Outcome.FAILED, kind

    async def _quarantine(
        self, message: Message, verdict: Verdict, effect: Effect
    ) -> tuple[Reply, Outcome, str]:
        if self.quarantine is None:
            raise RuntimeError("quarantine action without a quarantine store")
        qid = await self.quarantine.put(message, verdict)
        return Reply(250, "2.0.0", f"Ok: queued as {qid}"), effect.outcome, "none"


_UNSAFE_HELO = re.compile(r"[^A-Za-z0-9.:_\[\]-]")


def received(message: Message, hostname: str) -> str:
    """RFC 5321 4.4 trace field for this hop (ESMTPS when TLS was used)."""
    peer = message.peer
    helo = _UNSAFE_HELO.sub("?", peer.helo or "unknown")[:255]  # client-chosen text
    literal = f"IPv6:{peer.ip}" if ":" in peer.ip else peer.ip
    tcp_info = f" ([{literal}])" if peer.ip else ""  # "": XFORWARD said the client is unknown
    proto = ("ESMTP" if peer.esmtp else "SMTP") + ("S" if peer.tls_version else "")
    tls = f" ({peer.tls_version})" if peer.tls_version else ""
    rcpts = message.envelope.rcpt_to
    for_clause = f"\r\n\tfor <{rcpts[0]}>" if len(rcpts) == 1 else ""
    stamp = email.utils.formatdate(message.received_at, localtime=False)
    return (
        f"from {helo}{tcp_info}\r\n\tby {hostname} (relay) with {proto}{tls}"
        f" id {message.queue_id}{for_clause};\r\n\t{stamp}"
    )


def _log_report(report: MessageReport) -> None:
    """One structured line per message: ids, sizes, outcome, timings; never body or secrets."""
    v = report.verdict
    timing = " ".join(f"{k}_ms={s * 1000:.2f}" for k, s in report.timings)
    log.info(
        "queue_id=%s size=%d rcpts=%d outcome=%s reply=%d policy=%s mode=%s action=%s "
        "score=%.2f tier=%s rules=%s %s",
        report.queue_id,
        report.size,
        report.recipients,
        report.outcome,
        report.reply.code,
        v.policy,
        v.mode.value,
        v.action.value,
        v.score,
        "-" if v.highest_tier is None else v.highest_tier.label,
        ",".join(h.rule for h in v.hits) or "-",
        timing,
    )

"""The aiosmtpd hooks: what an accepted EHLO, MAIL, RCPT, RSET and DATA do.

RCPT is mirrored to the downstream (its answer becomes ours); DATA becomes a ``Message``
handed to ``Pipeline.process``, whose reply is the client's. The hooks hold no state:
the connection's state is on ``RelaySMTP`` and they change it only through its public
methods.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence

from aiosmtpd.smtp import Envelope, Session

from relay.message import Envelope as MsgEnvelope
from relay.message import Message, Peer, starts_with_continuation, to_crlf
from relay.reply import (
    INTERNAL_ERROR,
    LEADING_CONTINUATION,
    NUL_IN_DATA,
    SMUGGLING,
    TOO_MANY_RCPTS,
)
from relay.smtp.server import RelaySMTP, introspected_names
from relay.smtp.xforward import EHLO_KEYWORD, client_address


class Handler:
    """aiosmtpd hooks; all state is on the RelaySMTP instance passed as ``server``."""

    def __dir__(self) -> list[str]:
        """Only the hooks: aiosmtpd introspects the handler on every connection too
        (``RelaySMTP.__dir__``)."""
        return list(introspected_names(type(self)))

    @staticmethod
    async def handle_EHLO(
        server: RelaySMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        # EHLO resets a transaction (RFC 5321 4.1.4): its downstream and what it reserved go.
        server.abort_transaction()
        server.forget_xforward()
        # AUTH is not offered (no authenticator); XFORWARD only to trusted proxies.
        out = [r for r in responses if not r[4:].upper().startswith("AUTH")]
        # aiosmtpd reads pipelined commands in order from its stream and answers each in
        # turn (RCPT answers mirrored from the downstream included), so PIPELINING holds.
        out[len(out) - 1 : len(out) - 1] = ["250-PIPELINING", "250-ENHANCEDSTATUSCODES"]
        if server.may_xforward():
            out.insert(len(out) - 1, f"250-{EHLO_KEYWORD}")
        return out

    async def handle_MAIL(
        self,
        server: RelaySMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        server.abort_transaction()
        refusal = server.begin_transaction(
            smtputf8="SMTPUTF8" in mail_options, size=declared_size(mail_options)
        )
        if refusal is not None:
            return refusal.line
        # aiosmtpd's convention: "<>" stands for the null reverse-path, so that the
        # envelope's mail_from is truthy once MAIL was accepted.
        envelope.mail_from = address or "<>"
        envelope.mail_options.extend(mail_options)
        envelope.smtp_utf8 = server.smtputf8
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self,
        server: RelaySMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if len(envelope.rcpt_tos) >= server.deps.settings.smtp.max_recipients:
            return server.refuse_recipient(TOO_MANY_RCPTS)
        downstream = await server.downstream(
            reverse_path(envelope), _mail_options(envelope.mail_options)
        )
        reply = await downstream.add_recipient(address)
        if not reply.ok:
            return server.refuse_recipient(reply)
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_RSET(self, server: RelaySMTP, session: Session, envelope: Envelope) -> str:
        server.abort_transaction()
        server.forget_xforward()
        return "250 2.0.0 Ok"

    async def handle_DATA(self, server: RelaySMTP, session: Session, envelope: Envelope) -> str:
        txn, decider = server.take_transaction()
        try:
            raw = envelope.original_content or b""
            refusal = SMUGGLING if server.data_lines.smuggling else None
            if refusal is None and b"\0" in raw:
                refusal = NUL_IN_DATA
            if refusal is None and starts_with_continuation(raw):
                refusal = LEADING_CONTINUATION  # it would extend the header we add above it
            if refusal is not None:
                if txn is not None:
                    await txn.abort()
                return refusal.line
            if txn is None:
                return INTERNAL_ERROR.line
            message = build_message(server, session, envelope, raw)
            reply = await server.deps.pipeline.process(message, txn, decider)
            return reply.line
        finally:
            server.end_transaction()


# aiosmtpd reads handle_EHLO's signature on every connection too (to tell its old
# 4-argument hook from this one); inspect.signature returns the __signature__ a function
# carries, so it is worked out once, here: 21 us a connection down to 7. A static method,
# so that what aiosmtpd gets from the handler is that function itself: the signature of a
# bound method is built anew on every call (its first parameter dropped), 3 us more.
Handler.handle_EHLO.__signature__ = inspect.signature(Handler.handle_EHLO)  # type: ignore[attr-defined]


def _mail_options(options: Sequence[str]) -> list[str]:
    """ESMTP MAIL parameters passed on to the downstream (SIZE, BODY, SMTPUTF8)."""
    return [o for o in options if o.upper().split("=", 1)[0] in ("SIZE", "BODY", "SMTPUTF8")]


def declared_size(options: Sequence[str]) -> int:
    """SIZE= on MAIL (RFC 1870), 0 when absent; ``paths.check_mail`` made it a number."""
    for option in options:
        key, _, value = option.partition("=")
        if key.upper() == "SIZE":
            return int(value)
    return 0


def reverse_path(envelope: Envelope) -> str:
    """The envelope sender, "" for the null sender (aiosmtpd reports it as "<>")."""
    sender = envelope.mail_from or ""
    return "" if sender == "<>" else sender


def build_message(server: RelaySMTP, session: Session, envelope: Envelope, raw: bytes) -> Message:
    """The DATA as our ``Message``: the envelope as accepted, and the client as the
    connection knows it (XFORWARD's attributes when a trusted proxy sent them)."""
    peer = session.peer if isinstance(session.peer, tuple) else ("", 0)
    xf = server.xforward
    helo = xf.get("HELO") or session.host_name or None
    port = (
        int(xf["PORT"]) if xf.get("PORT", "").isdigit() else (int(peer[1]) if len(peer) > 1 else 0)
    )
    tls = None
    if session.ssl is not None:
        ssl_object = session.ssl.get("ssl_object")
        tls = str(ssl_object.version()) if ssl_object is not None else "TLS"
    return Message(
        raw=to_crlf(raw) if server.data_lines.bare_line_ends else raw,
        received_at=time.time(),  # the arrival time: the SMTP layer is the clock here
        envelope=MsgEnvelope(
            mail_from=reverse_path(envelope),
            rcpt_to=tuple(envelope.rcpt_tos),
            mail_options=tuple(envelope.mail_options),
            smtputf8=server.smtputf8,
        ),
        peer=Peer(
            ip=client_address(server.client_ip()),  # "": XFORWARD said unavailable
            port=port,
            helo=helo,
            rcpt_attempted=server.attempted_rcpts,
            rcpt_refused=server.refused_rcpts,
            tls_version=tls,
            esmtp=bool(session.extended_smtp),
        ),
    )

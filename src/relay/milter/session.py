"""One milter connection: the MTA's events gathered into a ``Message``, the pipeline run
at end of message, its reply said as milter actions.

The MTA (Postfix, Sendmail) stays in charge of the SMTP session, relay control, TLS,
queueing and delivery; we are asked once per message, at end of message, exactly like
the SMTP front door's DATA. The pipeline's "delivery" is a ``Verdict`` transaction here:
``send`` keeps the stamped message instead of sending it, and the header changes the
stamps made become milter header actions (edits.py). The verdict maps so:

    pipeline result                      milter reply
    delivered (accept, tag, shadow)      header actions, then continue
    quarantined in our store             discard (the MTA answers 250, keeps nothing)
    refused 4xx / 5xx                    SMFIR_REPLYCODE with the rule's reply
    our failure (451 4.3.0)              SMFIR_REPLYCODE 451: the MTA tempfails

Every step but end of message is negotiated "no reply" where the MTA allows it (one
round trip per message instead of one per header and body chunk).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from relay.message import Envelope, Message, Peer, new_queue_id, to_crlf
from relay.milter import wire
from relay.milter.edits import Field, header_edits
from relay.pipeline.process import Pipeline
from relay.reply import Reply

log = logging.getLogger("relay.milter")

ACTIONS = wire.Actions.ADDHDRS | wire.Actions.CHGHDRS
# Steps we do not need (DATA, unknown commands) and no replies but at end of message.
WANTED = (
    wire.Proto.NODATA
    | wire.Proto.NOUNKNOWN
    | wire.Proto.NR_CONN
    | wire.Proto.NR_HELO
    | wire.Proto.NR_MAIL
    | wire.Proto.NR_RCPT
    | wire.Proto.NR_DATA
    | wire.Proto.NR_UNKN
    | wire.Proto.NR_EOH
    | wire.Proto.NR_BODY
    | wire.Proto.NR_HDR
    | wire.Proto.HDR_LEADSPC
)
# Asked for at negotiation (Postfix honours the lists); the defaults cover most already.
MACROS = {
    wire.Stage.CONNECT: "j {client_addr} {client_name} {daemon_name}",
    wire.Stage.HELO: "{tls_version} {cipher}",
    wire.Stage.ENVFROM: "i {auth_authen} {auth_type} {mail_addr}",
    wire.Stage.EOM: "i",
}
# Steps whose reply the MTA waits for unless negotiated away.
_REPLY_UNLESS = {
    b"C": wire.Proto.NR_CONN,
    b"H": wire.Proto.NR_HELO,
    b"M": wire.Proto.NR_MAIL,
    b"R": wire.Proto.NR_RCPT,
    b"T": wire.Proto.NR_DATA,
    b"U": wire.Proto.NR_UNKN,
    b"N": wire.Proto.NR_EOH,
    b"B": wire.Proto.NR_BODY,
    b"L": wire.Proto.NR_HDR,
}
_QUEUE_ID = re.compile(r"[A-Za-z0-9]{1,64}")
MAX_MACROS = 64  # distinct macro names kept per connection and per message


@dataclass(frozen=True, slots=True)
class MilterLimits:
    max_message_size: int  # header fields + body, as rebuilt; beyond: 552 at end of message
    idle_timeout: float  # seconds the MTA may stay silent before we close


@dataclass
class KeptTransaction:
    """The pipeline's Transaction for the milter door: keeps the stamped message."""

    sent: Message | None = None

    async def add_recipient(self, address: str) -> Reply:
        return Reply(250, "2.1.5", "Ok")

    async def send(self, message: Message) -> Reply:
        self.sent = message
        return Reply(250, "2.0.0", "Ok")

    async def abort(self) -> None:
        self.sent = None


@dataclass
class _Mail:
    """One message's events, reset at abort and after end of message."""

    mail_from: str = ""
    mail_args: tuple[str, ...] = ()
    rcpts: list[str] = field(default_factory=list)
    fields: list[Field] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    size: int = 0
    macros: dict[str, str] = field(default_factory=dict)


class MilterSession:
    """The state of one MTA connection; ``run`` serves it until quit or error."""

    def __init__(
        self,
        pipeline: Pipeline,
        limits: MilterLimits,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.pipeline = pipeline
        self.limits = limits
        self.reader = reader
        self.writer = writer
        self.protocol = wire.Proto(0)
        self.connect: wire.Connect | None = None
        self.helo: str | None = None
        self.conn_macros: dict[str, str] = {}
        self.mail = _Mail()
        self.messages = 0
        self.busy = False  # inside the pipeline: the drain waits for the answer

    async def run(self) -> None:
        try:
            while True:
                command = await self._read()
                if command is None:
                    return
                if not await self._handle(command):
                    return
        except wire.MilterProtocolError as exc:
            log.warning("milter: protocol error, closing: %s", exc)  # our text, no client bytes
        except TimeoutError:
            log.warning("milter: MTA silent for %.0fs, closing", self.limits.idle_timeout)
        except (ConnectionError, asyncio.IncompleteReadError):
            log.info("milter: connection lost")

    async def _read(self) -> wire.Command | None:
        timeout = self.limits.idle_timeout
        try:
            head = await asyncio.wait_for(self.reader.readexactly(4), timeout)
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise wire.MilterProtocolError("truncated packet header") from None
            return None  # closed between packets: a normal end
        size = wire.packet_size(head)
        try:
            payload = await asyncio.wait_for(self.reader.readexactly(size), timeout)
        except asyncio.IncompleteReadError:
            raise wire.MilterProtocolError(f"truncated packet (announced {size} bytes)") from None
        return wire.decode(payload)

    async def _send(self, *packets: bytes) -> None:
        self.writer.write(b"".join(packets))
        await self.writer.drain()

    async def _continue(self, command: bytes) -> None:
        flag = _REPLY_UNLESS.get(command)
        if flag is not None and not self.protocol & flag:
            await self._send(wire.CONTINUE)

    async def _handle(self, command: wire.Command) -> bool:
        """One command; False when the session ends."""
        match command:
            case wire.OptNeg():
                await self._negotiate(command)
            case wire.Macros():
                target = self.conn_macros if command.command in (b"C", b"H") else self.mail.macros
                for key, text in command.values:  # bounded: any local process may connect
                    if key in target or len(target) < MAX_MACROS:
                        target[key] = text
            case wire.Connect():
                self.connect = command
                await self._continue(b"C")
            case wire.Helo():
                self.helo = command.name
                await self._continue(b"H")
            case wire.MailFrom():
                self.mail = _Mail(macros=self.mail.macros)
                self.mail.mail_from, self.mail.mail_args = command.address, command.args
                await self._continue(b"M")
            case wire.RcptTo():
                self._grow(len(command.address))  # recipients count against the size too
                if self.mail.size <= self.limits.max_message_size:
                    self.mail.rcpts.append(command.address)
                await self._continue(b"R")
            case wire.Header():
                self._grow(len(command.name) + len(command.value) + 3)
                if self.mail.size <= self.limits.max_message_size:
                    value = _crlf_value(command.value, self.protocol)
                    self.mail.fields.append((command.name, value))
                await self._continue(b"L")
            case wire.Body():
                self._grow(len(command.chunk))
                if self.mail.size <= self.limits.max_message_size:
                    self.mail.body += command.chunk
                await self._continue(b"B")
            case wire.Simple(command=wire.EOM):
                await self._send(*await self._end_of_message())
                self.mail = _Mail()
            case wire.Simple(command=wire.ABORT):
                self.mail = _Mail()
            case wire.Simple(command=wire.QUIT):
                return False
            case wire.Simple(command=wire.QUIT_NC):  # a new SMTP session on this connection
                self.connect, self.helo, self.conn_macros, self.mail = None, None, {}, _Mail()
            case wire.Simple():  # DATA, end of headers, unknown: nothing to keep
                await self._continue(command.command)
        return True

    async def _negotiate(self, offer: wire.OptNeg) -> None:
        if offer.version < 2:
            raise wire.MilterProtocolError(f"MTA speaks milter version {offer.version}")
        if not offer.actions & wire.Actions.ADDHDRS or not offer.actions & wire.Actions.CHGHDRS:
            # Without them a verdict could not be written into the message: refuse to run
            # half-way rather than deliver mail without our headers.
            raise wire.MilterProtocolError("MTA does not allow adding and changing headers")
        self.protocol = WANTED & offer.protocol
        macros = MACROS if offer.version >= 6 else None
        await self._send(wire.optneg_reply(ACTIONS & offer.actions, self.protocol, macros))

    def _grow(self, size: int) -> None:
        self.mail.size += size

    async def _end_of_message(self) -> list[bytes]:
        mail = self.mail
        if mail.size > self.limits.max_message_size:
            return [wire.reply_code(552, "5.3.4", "Message too big for the filter")]
        message = self._message(mail)
        txn = KeptTransaction()
        self.busy = True
        try:
            reply = await self.pipeline.process(message, txn, trace=False)
        finally:
            self.busy = False
        self.messages += 1
        if txn.sent is not None and reply.code < 300:
            return [*header_edits(mail.fields, txn.sent.raw).packets(), wire.CONTINUE]
        if reply.code < 300:  # kept in our quarantine store: the MTA must not deliver it
            return [wire.DISCARD]
        return [wire.reply_code(reply.code, reply.status, reply.text)]

    def _message(self, mail: _Mail) -> Message:
        macros = {**self.conn_macros, **mail.macros}
        head = b"".join(name + b":" + value for name, value in mail.fields)
        body = bytes(mail.body)
        if b"\n" in body.replace(b"\r\n", b""):  # bare line ends: as the SMTP door does
            body = to_crlf(body)
        queue_id = macros.get("i", "")
        return Message(
            raw=head + b"\r\n" + body,
            received_at=time.time(),  # the end of message: the door is the clock here
            queue_id=queue_id if _QUEUE_ID.fullmatch(queue_id) else new_queue_id(),
            envelope=Envelope(
                mail_from=_path(mail.mail_from),
                rcpt_to=tuple(_path(r) for r in mail.rcpts),
                mail_options=_options(mail.mail_args),
                smtputf8=any(a.upper() == "SMTPUTF8" for a in mail.mail_args),
            ),
            peer=self._peer(macros, len(mail.rcpts)),
        )

    def _peer(self, macros: dict[str, str], rcpts: int) -> Peer:
        connect = self.connect
        ip = macros.get("{client_addr}", "")
        if not ip and connect is not None and connect.family in ("4", "6"):
            ip = connect.address
        if ip.lower().startswith("ipv6:"):
            ip = ip[5:]
        port = connect.port if connect is not None else 0
        return Peer(
            ip=ip,
            port=port,
            helo=self.helo,
            tls_version=macros.get("{tls_version}") or None,
            rcpt_attempted=rcpts,
            authenticated=bool(macros.get("{auth_authen}")),
        )


def _crlf_value(value: bytes, protocol: wire.Proto) -> bytes:
    """A header value as it sits after the colon in the message: the MTA's LF line
    breaks as CRLF, a final CRLF, and the space after the colon that an MTA without
    SMFIP_HDR_LEADSPC strips."""
    value = value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if not protocol & wire.Proto.HDR_LEADSPC:
        value = b" " + value
    return value + b"\r\n"


def _path(address: str) -> str:
    """``<addr>`` as the MTA passes it, without the brackets; "" for the null sender."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    return address


def _options(args: Sequence[str]) -> tuple[str, ...]:
    return tuple(a for a in args if a.upper().split("=", 1)[0] in ("SIZE", "BODY", "SMTPUTF8"))

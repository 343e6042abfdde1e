"""The MTA's side of the milter protocol, for tests of the milter door without Postfix
(tests/test_milter.py); tests/test_milter_postfix.py uses the real one."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from dataclasses import dataclass, field

from relay.milter import wire

# What Postfix 3.7 offers: every action, and every protocol step flag it knows.
MTA_ACTIONS = 0x1FF
MTA_PROTOCOL = 0x1FFFFF
FINAL = frozenset(b"acdrty")  # replies that end a step


def pkt(command: bytes, data: bytes = b"") -> bytes:
    return wire.packet(command, data)


def macros(command: bytes, values: dict[str, str]) -> bytes:
    data = command + b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in values.items())
    return pkt(b"D", data)


@dataclass
class Result:
    """What the filter answered at end of message."""

    final: bytes  # the command letter of the final reply
    reply: str = ""  # SMFIR_REPLYCODE text
    edits: list[tuple[bytes, bytes]] = field(default_factory=list)  # (letter, data)


@dataclass
class MiltMta:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    protocol: int = 0  # what the filter asked for

    @classmethod
    async def connect(cls, address: str) -> MiltMta:
        host, port = address.removeprefix("inet:").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        return cls(reader, writer)

    async def read_packet(self) -> tuple[bytes, bytes]:
        head = await asyncio.wait_for(self.reader.readexactly(4), 30)
        (size,) = struct.unpack("!I", head)
        data = await asyncio.wait_for(self.reader.readexactly(size), 30)
        return data[:1], data[1:]

    async def negotiate(
        self, actions: int = MTA_ACTIONS, protocol: int = MTA_PROTOCOL, version: int = 6
    ) -> tuple[int, int, bytes]:
        self.writer.write(pkt(b"O", struct.pack("!III", version, actions, protocol)))
        letter, data = await self.read_packet()
        assert letter == b"O", letter
        _, acts, proto = struct.unpack("!III", data[:12])
        self.protocol = proto
        return acts, proto, data[12:]

    async def step(self, packet: bytes, no_reply_flag: int) -> None:
        """Send one event; read the filter's "continue" unless it asked for no reply."""
        self.writer.write(packet)
        if not self.protocol & no_reply_flag:
            letter, _ = await self.read_packet()
            assert letter == b"c", letter

    async def message(
        self,
        *,
        mail_from: str = "<alice@tag.test>",
        rcpts: tuple[str, ...] = ("<bob@example.org>",),
        headers: tuple[tuple[bytes, bytes], ...] = (
            (b"From", b" alice@tag.test"),
            (b"To", b" bob@example.org"),
            (b"Subject", b" hello"),
        ),
        body: bytes = b"Hello Bob.\r\n",
        client: tuple[str, str] = ("mail.tag.test", "192.0.2.10"),
        helo: str = "mail.tag.test",
        queue_id: str = "4ABCDEF123",
        extra_macros: dict[str, str] | None = None,
    ) -> Result:
        """One whole SMTP session's worth of events, as Postfix sends them."""
        P = wire.Proto
        self.writer.write(macros(b"C", {"j": "mx.example.org", "{client_addr}": client[1]}))
        name, ip = client
        await self.step(
            pkt(
                b"C", name.encode() + b"\0" + b"4" + struct.pack("!H", 40000) + ip.encode() + b"\0"
            ),
            P.NR_CONN,
        )
        await self.step(pkt(b"H", helo.encode() + b"\0"), P.NR_HELO)
        self.writer.write(macros(b"M", {"i": queue_id, **(extra_macros or {})}))
        await self.step(pkt(b"M", mail_from.encode() + b"\0"), P.NR_MAIL)
        for rcpt in rcpts:
            await self.step(pkt(b"R", rcpt.encode() + b"\0"), P.NR_RCPT)
        for hname, value in headers:
            await self.step(pkt(b"L", hname + b"\0" + value + b"\0"), P.NR_HDR)
        await self.step(pkt(b"N"), P.NR_EOH)
        for i in range(0, len(body), 65535):
            await self.step(pkt(b"B", body[i : i + 65535]), P.NR_BODY)
        self.writer.write(macros(b"E", {"i": queue_id}))
        self.writer.write(pkt(b"E"))
        return await self.result()

    async def result(self) -> Result:
        edits: list[tuple[bytes, bytes]] = []
        while True:
            letter, data = await self.read_packet()
            if letter[0] in FINAL:
                reply = data.rstrip(b"\0").decode() if letter == b"y" else ""
                return Result(letter, reply, edits)
            edits.append((letter, data))

    async def close(self) -> None:
        self.writer.write(pkt(b"Q"))
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


def header_action(data: bytes) -> tuple[int, str, bytes]:
    """(index, name, value) of an SMFIR_INSHEADER / SMFIR_CHGHEADER packet's data."""
    (index,) = struct.unpack("!I", data[:4])
    name, value, _ = data[4:].split(b"\0")
    return int(index), name.decode(), value

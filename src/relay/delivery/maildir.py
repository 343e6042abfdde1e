"""The embedded default transport: one local Maildir (tmp/ -> fsync -> rename into new/ ->
fsync dir), with a Return-Path header; every recipient is accepted."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path

from relay.contracts import Transaction, XForward
from relay.durable import fsync_dir, write_new_file
from relay.errors import TemporaryDeliveryError
from relay.message import Message
from relay.reply import Reply


class MaildirTransport:
    """Delivers into one local Maildir (tmp/ -> fsync -> rename into new/ -> fsync dir)."""

    name = "maildir"

    def __init__(self, root: Path) -> None:
        self.root = root
        for sub in ("tmp", "new", "cur"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self._host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
        self._seq = 0

    def _unique(self) -> str:
        self._seq += 1
        now = time.time()
        return f"{int(now)}.M{int((now % 1) * 1e6)}P{os.getpid()}Q{self._seq}.{self._host}"

    def write(self, data: bytes) -> str:
        """Blocking write; run off the event loop."""
        name = self._unique()
        tmp = self.root / "tmp" / name
        write_new_file(tmp, data)
        tmp.rename(self.root / "new" / name)
        fsync_dir(self.root / "new")
        return name

    async def begin(
        self, mail_from: str, options: Sequence[str] = (), xforward: XForward | None = None
    ) -> Transaction:
        return _MaildirTransaction(self, mail_from)

    async def probe(self) -> bool:
        return os.access(self.root / "new", os.W_OK)

    async def close(self) -> None:
        return None


class _MaildirTransaction:
    def __init__(self, transport: MaildirTransport, mail_from: str) -> None:
        self._transport = transport
        self._mail_from = mail_from

    async def add_recipient(self, address: str) -> Reply:
        return Reply(250, "2.1.5", "Ok")

    async def send(self, message: Message) -> Reply:
        data = message.with_prepended([("Return-Path", f"<{self._mail_from}>")]).raw
        try:
            await asyncio.to_thread(self._transport.write, data)
        except OSError as exc:
            raise TemporaryDeliveryError(451, "4.3.0", "Local mailbox unavailable") from exc
        return Reply(250, "2.0.0", f"Ok: queued as {message.queue_id}")

    async def abort(self) -> None:
        return None

"""The milter listener: a TCP or unix socket, one ``MilterSession`` per MTA connection,
a connection limit, and the drain on shutdown.

On shutdown a session waiting for its next command is closed at once (the MTA opens a
new one for its next SMTP session, or applies ``milter_default_action``); one inside the
pipeline gets ``drain`` seconds to answer, as the SMTP door's do. A connection closed
before we answered end of message leaves the MTA to tempfail it (Postfix:
``milter_default_action = tempfail``, which deploy/postfix/milter.md sets), so nothing the
MTA acknowledged was unfiltered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from relay.config import MilterSettings, parse_milter_listen
from relay.listening import LISTEN_BACKLOG, listening_socket, unix_listening_socket
from relay.milter.session import MilterLimits, MilterSession
from relay.pipeline.process import Pipeline

log = logging.getLogger("relay.milter")


@dataclass
class MilterServer:
    pipeline: Pipeline
    settings: MilterSettings
    limits: MilterLimits
    server: asyncio.Server | None = None
    sessions: dict[asyncio.Task[None], MilterSession] = field(default_factory=dict)
    refused: int = 0  # connections over the limit, closed at once

    @property
    def address(self) -> str:
        """Where we listen, in Postfix's spelling (for logs and tests)."""
        assert self.server is not None and self.server.sockets
        name = self.server.sockets[0].getsockname()
        if isinstance(name, str):
            return f"unix:{name}"
        return f"inet:{name[0]}:{name[1]}"

    async def start(self, *, reuse_port: bool = False) -> None:
        kind, where, port = parse_milter_listen(self.settings.listen)
        loop = asyncio.get_running_loop()
        if kind == "unix":
            sock = unix_listening_socket(Path(where), self.settings.socket_mode)
            self.server = await loop.create_unix_server(self._factory, sock=sock)
        else:
            sock = listening_socket(where, port, reuse_port=reuse_port)
            self.server = await loop.create_server(self._factory, sock=sock, backlog=LISTEN_BACKLOG)

    def _factory(self) -> asyncio.StreamReaderProtocol:
        reader = asyncio.StreamReader(limit=2**16)
        return asyncio.StreamReaderProtocol(reader, self._serve)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self.sessions) >= self.settings.max_connections:
            # The MTA treats a closed milter per milter_default_action (tempfail): the
            # sender retries later, nothing is lost.
            self.refused += 1
            log.warning("milter: %d connections open, refusing one", len(self.sessions))
            writer.close()
            return
        session = MilterSession(self.pipeline, self.limits, reader, writer)
        self.sessions[task] = session
        try:
            await session.run()
        finally:
            del self.sessions[task]
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def close(self, drain: float) -> None:
        """Stop accepting; sessions between commands close now, those in the pipeline
        get ``drain`` seconds, then their connection is closed too (the MTA tempfails the
        message). Connections are closed, never their tasks cancelled: a session ends by
        its own read failing, so its cleanup runs in order."""
        if self.server is not None:
            self.server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain
        while self.sessions and loop.time() < deadline:
            for session in list(self.sessions.values()):
                if not session.busy:
                    session.writer.close()
            await asyncio.sleep(0.05)
        for session in list(self.sessions.values()):
            session.writer.transport.abort()
        if self.sessions:
            await asyncio.wait(list(self.sessions), timeout=5.0)
        if self.server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), timeout=2.0)

"""The listening side: the bound socket (relay/listening.py, shared by workers with
SO_REUSEPORT), the STARTTLS context, and the asyncio server that makes one ``RelaySMTP``
per connection."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path
from typing import Any

from relay.listening import LISTEN_BACKLOG, listening_socket
from relay.smtp.handler import Handler
from relay.smtp.server import RelaySMTP, SmtpDeps


def server_tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """STARTTLS context: TLS 1.2+ with the library's default (modern) ciphers."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


async def start_server(deps: SmtpDeps, sock: socket.socket) -> asyncio.Server:
    """Serve SMTP on ``sock``: one ``RelaySMTP`` per connection, the hooks shared."""
    loop = asyncio.get_running_loop()
    handler = Handler()  # stateless

    def factory() -> Any:
        return RelaySMTP(deps, handler)

    # asyncio re-listens on a passed socket with its own default backlog (100) unless told.
    return await loop.create_server(factory, sock=sock, backlog=LISTEN_BACKLOG)


__all__ = ["LISTEN_BACKLOG", "listening_socket", "server_tls_context", "start_server"]

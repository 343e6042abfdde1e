"""The listening side: the bound socket (shared by workers with SO_REUSEPORT), the
STARTTLS context, and the asyncio server that makes one ``RelaySMTP`` per connection."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path
from typing import Any

from relay.smtp.handler import Handler
from relay.smtp.server import RelaySMTP, SmtpDeps

LISTEN_BACKLOG = 1024


def server_tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """STARTTLS context: TLS 1.2+ with the library's default (modern) ciphers."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


def listening_socket(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    """A bound, listening TCP socket; SO_REUSEPORT lets worker processes share the port."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, socktype, proto, _, addr = infos[0]
    sock = socket.socket(family, socktype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def start_server(deps: SmtpDeps, sock: socket.socket) -> asyncio.Server:
    """Serve SMTP on ``sock``: one ``RelaySMTP`` per connection, the hooks shared."""
    loop = asyncio.get_running_loop()
    handler = Handler()  # stateless

    def factory() -> Any:
        return RelaySMTP(deps, handler)

    # asyncio re-listens on a passed socket with its own default backlog (100) unless told.
    return await loop.create_server(factory, sock=sock, backlog=LISTEN_BACKLOG)

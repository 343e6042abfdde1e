"""Listening sockets for the front doors (SMTP, milter): bound, listening, non-blocking.

Both doors share the one way to listen, so workers share a TCP port the same way
(SO_REUSEPORT) and a unix socket is made safe the same way.
"""

from __future__ import annotations

import contextlib
import socket
import stat
from pathlib import Path
from typing import Any

LISTEN_BACKLOG = 1024


def _listening(
    sock: socket.socket, bind: tuple[Any, ...] | str, chmod: tuple[Path, int] | None
) -> socket.socket:
    try:
        sock.bind(bind)
        if chmod is not None:  # before listen: nobody can connect until then anyway
            chmod[0].chmod(chmod[1])
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def listening_socket(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    """A bound, listening TCP socket; SO_REUSEPORT lets worker processes share the port."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, socktype, proto, _, addr = infos[0]
    sock = socket.socket(family, socktype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    except OSError:
        sock.close()
        raise
    return _listening(sock, addr, None)


def unix_listening_socket(path: Path, mode: int) -> socket.socket:
    """A listening unix socket with ``mode``. A stale socket file left by a crash is
    replaced; anything else at the path is refused. Until the chmod the file has the
    umask's mode, never wider than asked under the usual 022 or 077."""
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise OSError(f"{path} exists and is not a socket")
        path.unlink()
    return _listening(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), str(path), (path, mode))

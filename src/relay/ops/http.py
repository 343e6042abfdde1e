"""The operations endpoint: /metrics, /healthz and /readyz over a minimal HTTP/1.1 server.

Only what Prometheus and health checkers send is understood: ``GET`` or ``HEAD``, a path,
headers, no body. Every response closes the connection. Rendering the exposition walks
every metric (and, with several workers, reads their files), so it runs in a thread: a
scrape during a mail storm never stalls the event loop that carries SMTP sessions.

    server = await start_metrics_server(settings.metrics, registry, readiness)
    ...
    await server.close()

``readiness`` returns (or awaits to) a mapping ``check -> bool`` or a ``Health`` (the
checks plus what is degraded). /readyz answers with a JSON body either way::

    {"ready": true, "status": "ok", "checks": {...}, "degraded": {}}
    {"ready": true, "status": "degraded", "checks": {...}, "degraded": {"state": ["bulk_count"]}}
    {"ready": false, "status": "unready", "checks": {..., "listening": false}, "degraded": {}}

``unready`` (a check failed) is 503: take the relay out of rotation. ``degraded`` is 200
on purpose: facts are failing (kind -> facts, ops/faults.py) but mail flows, fail-open, and
every instance sharing the broken backend would be degraded at once, so a 503 would turn
a loss of bulk counting into a loss of all mail. Operators learn of it from the body,
``relay_fact_errors_total`` and the RelayFactErrors alert (docs/operations.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from relay.config import MetricsSettings
from relay.errors import ConfigError, RelayError
from relay.ops.multiprocess import scrape_registry

log = logging.getLogger("relay.ops.metrics")


@dataclass(frozen=True, slots=True)
class Health:
    """What /readyz reports: ``checks`` that must all pass (else 503), and ``degraded``,
    failure kind -> failing facts, while mail still flows (200, status "degraded")."""

    checks: Mapping[str, bool]
    degraded: Mapping[str, Sequence[str]] = field(default_factory=dict)


Readiness = Callable[
    [], Mapping[str, bool] | Health | Awaitable[Mapping[str, bool]] | Awaitable[Health]
]

MAX_LINE = 8192  # request line or one header line
MAX_HEADERS = 64
REQUEST_TIMEOUT = 10.0  # seconds to send the whole request head
READINESS_TIMEOUT = 5.0  # a readiness callback slower than this counts as not ready
MAX_CONCURRENT_RENDERS = 2  # scrapes beyond this wait instead of taking more threads

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    headers: Mapping[str, str]  # lower-case names


class BadRequest(RelayError):
    """A malformed or unsupported HTTP request: the endpoint answers ``status`` (400, or
    413 for a body over the limit)."""

    def __init__(self, text: str, status: int = 400) -> None:
        super().__init__(text)
        self.status = status


def text_response(status: int, text: str, *extra: tuple[str, str]) -> Response:
    return Response(status, (text + "\n").encode(), headers=extra)


async def read_request(reader: asyncio.StreamReader, *, body: bool = False) -> Request:
    """Parses the request head strictly; raises BadRequest for anything unexpected.

    ``body=True`` lets a Content-Length through for ``read_body`` (ops/learn.py); the
    head is then all that has been read."""
    line = await _line(reader)
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest("malformed request line")
    method, target, _version = parts
    if not target.startswith("/"):
        raise BadRequest("request target must be a path")
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS + 1):
        line = await _line(reader)
        if not line:
            break
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or " " in name:
            raise BadRequest("malformed header")
        key = name.lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    else:
        raise BadRequest("too many headers")
    if not body and (headers.get("content-length", "0") != "0" or "transfer-encoding" in headers):
        raise BadRequest("request bodies are not accepted")
    return Request(method, target.split("?", 1)[0], headers)


async def read_body(reader: asyncio.StreamReader, request: Request, limit: int) -> bytes:
    """The body a Content-Length announces: no chunking, at most ``limit`` bytes (413)."""
    if "transfer-encoding" in request.headers:
        raise BadRequest("Transfer-Encoding is not accepted; send a Content-Length")
    text = request.headers.get("content-length")
    if text is None:
        raise BadRequest("a Content-Length is required")
    if not (text.isascii() and text.isdigit()) or len(text) > 12:
        raise BadRequest("malformed Content-Length")
    length = int(text)
    if length > limit:
        raise BadRequest(f"body of {length} bytes is over the limit ({limit})", 413)
    try:
        return await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise BadRequest("connection closed mid-body") from None


async def _line(reader: asyncio.StreamReader) -> str:
    try:
        raw = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise BadRequest("line too long") from None
    except asyncio.IncompleteReadError:
        raise BadRequest("connection closed mid-request") from None
    if not raw.endswith(b"\r\n"):
        raise BadRequest("lines must end with CRLF")
    try:
        return raw[:-2].decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest("non-ASCII request head") from None


def render_metrics(registry: CollectorRegistry, accept: str) -> Response:
    """Prometheus text, or OpenMetrics when the Accept header asks for it (runs in a thread)."""
    encoder, content_type = choose_encoder(accept)
    return Response(200, encoder(scrape_registry(registry)), content_type)


class HttpListener:
    """A listening asyncio server around a subclass's ``_serve``; ``close()`` stops it."""

    _server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        """``reuse_port``: each of several workers binds the port (the kernel spreads
        connections), as their SMTP listeners do."""
        self._server = await asyncio.start_server(
            self._serve, host, port, limit=MAX_LINE, reuse_port=reuse_port or None
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class MetricsServer(HttpListener):
    """The running endpoint; ``close()`` stops it."""

    def __init__(self, registry: CollectorRegistry, readiness: Readiness | None = None) -> None:
        self._registry = registry
        self._readiness = readiness
        self._renders = asyncio.Semaphore(MAX_CONCURRENT_RENDERS)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = False
        try:
            try:
                request = await asyncio.wait_for(read_request(reader), REQUEST_TIMEOUT)
                head = request.method == "HEAD"
                response = await self._respond(request)
            except BadRequest as exc:
                response = text_response(exc.status, str(exc))
            except TimeoutError:
                return
            await write_response(writer, response, head)
        except (ConnectionError, OSError):
            pass  # the client went away; nothing to answer
        except Exception:
            log.exception("metrics endpoint failure")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _respond(self, request: Request) -> Response:
        if request.path not in ("/metrics", "/healthz", "/readyz"):
            return text_response(404, "not found")
        if request.method not in ("GET", "HEAD"):
            return text_response(405, "method not allowed", ("Allow", "GET, HEAD"))
        if request.path == "/healthz":
            return text_response(200, "ok")
        if request.path == "/readyz":
            return await self._ready()
        async with self._renders:
            return await asyncio.to_thread(
                render_metrics, self._registry, request.headers.get("accept", "")
            )

    async def _ready(self) -> Response:
        health: Health
        if self._readiness is None:
            health = Health({"alive": True})
        else:
            try:
                result = self._readiness()
                answer: Mapping[str, bool] | Health
                if inspect.isawaitable(result):
                    answer = await asyncio.wait_for(result, READINESS_TIMEOUT)
                else:
                    answer = result
                health = answer if isinstance(answer, Health) else Health(answer)
            except TimeoutError:
                health = Health({"readiness_check_timed_out": False})
            except Exception:
                log.exception("readiness check failed")
                health = Health({"readiness_check_failed": False})
        checks = {str(k): bool(v) for k, v in health.checks.items()}
        degraded = {str(k): [str(n) for n in v] for k, v in health.degraded.items()}
        ready = bool(checks) and all(checks.values())
        status = "unready" if not ready else "degraded" if degraded else "ok"
        doc = {"ready": ready, "status": status, "checks": checks, "degraded": degraded}
        body = json.dumps(doc, sort_keys=True).encode() + b"\n"
        return Response(200 if ready else 503, body, "application/json")


async def write_response(writer: asyncio.StreamWriter, response: Response, head: bool) -> None:
    lines = [
        f"HTTP/1.1 {response.status} {_REASONS.get(response.status, '')}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Cache-Control: no-store",
        "Connection: close",
        *(f"{k}: {v}" for k, v in response.headers),
    ]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("ascii"))
    if not head:
        writer.write(response.body)
    await writer.drain()


async def start_metrics_server(
    settings: MetricsSettings,
    registry: CollectorRegistry,
    readiness: Readiness | None = None,
    *,
    source: str = "config",
) -> MetricsServer:
    """Starts the endpoint on ``settings.listen``; a port in use is a ConfigError naming it.

    ``source`` names the configuration file in that error (``settings.source``).
    """
    host, port = settings.listen
    server = MetricsServer(registry, readiness)
    try:
        await server.start(host, port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            reason = f"port {port} on {host} is already in use (another relay or exporter?)"
        else:
            reason = f"cannot listen on {host}:{port}: {exc.strerror or exc}"
        raise ConfigError(source, "metrics.listen", reason) from None
    return server

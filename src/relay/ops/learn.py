"""The learn endpoint: ``POST /learn/spam``, ``/learn/ham`` and ``/forget`` with the raw
message as the body, for remote callers (a mail server's sieve, a webmail button).

Its own listener (``[feedback] http_listen``, loopback by default), not the metrics
port: the metrics port is often opened to a Prometheus host, and a port that changes the
model should be opened on purpose. Off unless ``[feedback] http_token_file`` names a
token; every request carries ``Authorization: Bearer <token>``, compared in constant
time. A missing or wrong token is 401 and counts ``relay_feedback_auth_failures_total``;
the body is not even read. A malformed request or an unparsable message is 400, a body
over ``max_message_size`` 413, a capped reporter 429. Neither tokens nor bodies are
logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter

from relay.config import FeedbackSettings
from relay.errors import ConfigError, FeedbackRefused, StateError
from relay.feedback.learn import Action, Learner, source_label
from relay.ops.http import (
    REQUEST_TIMEOUT,
    BadRequest,
    HttpListener,
    Request,
    Response,
    read_body,
    read_request,
    text_response,
    write_response,
)

log = logging.getLogger("relay.ops.learn")

_ROUTES: dict[str, Action] = {"/learn/spam": "spam", "/learn/ham": "ham", "/forget": "forget"}
_REFUSED_STATUS = {"too_large": 413, "reporter_cap": 429}
MAX_REPORTER = 256  # characters of an X-Relay-Reporter header


class FeedbackMetrics:
    """Counters of reports recorded, refused and unauthenticated (label values from fixed
    sets: labels, known sources, refusal reasons)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.recorded = Counter(
            "relay_feedback_recorded_total",
            "Feedback reports recorded, by action and source",
            ["action", "source"],
            registry=registry,
        )
        self.refused = Counter(
            "relay_feedback_refused_total",
            "Feedback reports refused (nothing learned), by reason",
            ["reason"],
            registry=registry,
        )
        self.auth_failures = Counter(
            "relay_feedback_auth_failures_total",
            "Learn endpoint requests with a missing or wrong token",
            registry=registry,
        )


def read_token(path: Path, source: str = "config") -> bytes:
    """The bearer token from a file only its owner can read (as the relay's key)."""
    key = "feedback.http_token_file"
    try:
        mode = path.stat().st_mode
        data = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(source, key, f"cannot read {path}: {exc.strerror or exc}") from None
    if mode & 0o077:
        raise ConfigError(source, key, f"{path} is readable by others: chmod 600 it")
    if len(data) < 16:
        raise ConfigError(source, key, f"{path} holds no token of at least 16 characters")
    return data


def authorised(request: Request, token: bytes) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode("utf-8", "replace"), token)


class LearnServer(HttpListener):
    """POST /learn/spam, /learn/ham, /forget with a bearer token (docs/feedback.md)."""

    def __init__(
        self,
        learner: Learner,
        token: bytes,
        metrics: FeedbackMetrics,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._learner = learner
        self._token = token
        self._metrics = metrics
        self._clock = clock  # the report's time is the time it arrives

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                response = await asyncio.wait_for(self._handle(reader), REQUEST_TIMEOUT)
            except BadRequest as exc:
                response = text_response(exc.status, str(exc))
            except TimeoutError:
                return
            await write_response(writer, response, False)
        except (ConnectionError, OSError):
            pass
        except Exception:
            log.exception("learn endpoint failure")  # never the body: it is not in the trace
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader) -> Response:
        request = await read_request(reader, body=True)
        action = _ROUTES.get(request.path)
        if action is None:
            return text_response(404, "not found")
        if request.method != "POST":
            return text_response(405, "method not allowed", ("Allow", "POST"))
        if not authorised(request, self._token):
            self._metrics.auth_failures.inc()
            return text_response(
                401, "a valid bearer token is required", ("WWW-Authenticate", "Bearer")
            )
        limit = self._learner.store.settings.max_message_size
        try:
            raw = await read_body(reader, request, limit)
        except BadRequest as exc:
            if exc.status == 413:
                self._metrics.refused.labels("too_large").inc()
            raise
        reporter = request.headers.get("x-relay-reporter", "http")[:MAX_REPORTER] or "http"
        try:
            outcome = await self._learner.learn(
                raw, action=action, reporter=reporter, source="http", now=self._clock()
            )
        except FeedbackRefused as exc:
            self._metrics.refused.labels(exc.reason).inc()
            return text_response(_REFUSED_STATUS.get(exc.reason, 400), str(exc))
        except StateError:
            log.exception("feedback store failed")
            return text_response(503, "feedback store unavailable")
        self._metrics.recorded.labels(action, source_label("http")).inc()
        body = {
            "digest": outcome.digest,
            "action": outcome.action,
            "previous": outcome.previous,
            "existed": outcome.existed,
        }
        return Response(200, json.dumps(body).encode() + b"\n", "application/json")


async def start_learn_server(
    settings: FeedbackSettings,
    learner: Learner,
    metrics: FeedbackMetrics,
    *,
    source: str = "config",
    reuse_port: bool = False,
) -> LearnServer | None:
    """The endpoint on ``settings.http_listen``, or None when no token file is set;
    ``reuse_port`` when every worker of several serves it."""
    if settings.http_token_file is None:
        return None
    token = read_token(settings.http_token_file, source)
    host, port = settings.http_listen
    server = LearnServer(learner, token, metrics)
    try:
        await server.start(host, port, reuse_port=reuse_port)
    except OSError as exc:
        reason = (
            f"port {port} on {host} is already in use"
            if exc.errno == errno.EADDRINUSE
            else f"cannot listen on {host}:{port}: {exc.strerror or exc}"
        )
        raise ConfigError(source, "feedback.http_listen", reason) from None
    return server

"""Does a relay configuration really do what it says? One message through it, inspected.

A variant is only worth timing if its feature is wired in: the probe starts the relay with
the scenario's config but a downstream we can read (an in-process aiosmtpd sink), sends
one message, and reports the header fields the relay added, the fields of its per-message
log line (policy, tier, rules) and whether the metrics endpoint answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session

from bench.client import drive
from bench.servers import TomlValue, start_relay

STARTUP_LIMIT = 600.0  # seconds; loading the model in every worker is the slow part
_LOG_FIELD = re.compile(r"\b(policy|tier|rules|outcome|action)=(\S+)")


@dataclass(frozen=True, slots=True)
class Probe:
    delivered: bool
    added_headers: tuple[str, ...] = ()
    log_fields: dict[str, str] = field(default_factory=dict)
    metrics_served: bool = False
    smtp_processes: int = 0
    error: str = ""
    shutdown: str = ""


class _Capture:
    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.messages.append(envelope.original_content or b"")
        return "250 2.0.0 Ok"


def _header_names(raw: bytes) -> list[str]:
    return [name.lower() for name in BytesHeaderParser().parsebytes(raw)]


async def _metrics_served(port: int) -> bool:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        body = await asyncio.wait_for(reader.read(), 5)
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return body.startswith(b"HTTP/1.") and b" 200 " in body[:20] and b"relay_" in body


async def probe_relay(
    workdir: Path,
    message: bytes,
    *,
    workers: int,
    overrides: Mapping[str, Mapping[str, TomlValue]],
    src: Path | None = None,
) -> Probe:
    loop = asyncio.get_running_loop()
    capture = _Capture()
    sink = await loop.create_server(
        lambda: SMTP(capture, decode_data=False, hostname="probe.bench"), "127.0.0.1", 0
    )
    sink_port = int(sink.sockets[0].getsockname()[1])
    relay = start_relay("probe", workdir, sink_port, workers=workers, overrides=overrides, src=src)
    failure = ""
    try:
        try:
            await relay.ready(within=STARTUP_LIMIT)
        except (TimeoutError, RuntimeError) as exc:
            failure = f"{exc}: {relay.log_tail(8)}".strip()
        else:
            processes = await relay.wait_workers(workers)
            result = await drive(relay.port, message, messages=1, sessions=1, reuse=False)
            metrics = (
                await _metrics_served(relay.metrics_port)
                if relay.metrics_port is not None
                else False
            )
    finally:
        stopped = relay.stop()
        sink.close()
        await sink.wait_closed()
    shutdown = stopped["exit"] + (
        f", {stopped['left_behind']} child process(es) left behind"
        if "left_behind" in stopped
        else ""
    )
    if failure:
        return Probe(delivered=False, error=failure, shutdown=shutdown)
    if not capture.messages:
        return Probe(delivered=False, error=f"not delivered: {result.errors}", shutdown=shutdown)
    before = _header_names(message)
    after = _header_names(capture.messages[0])
    added = list(after)
    for name in before:
        if name in added:
            added.remove(name)
    fields: dict[str, str] = {}
    for line in relay.log.read_text(errors="replace").splitlines():
        if "queue_id=" in line:
            fields = dict(_LOG_FIELD.findall(line))
    return Probe(
        delivered=True,
        added_headers=tuple(added),
        log_fields=fields,
        metrics_served=metrics,
        smtp_processes=processes,
        shutdown=shutdown,
    )

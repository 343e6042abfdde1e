"""The baseline: a bare aiosmtpd + aiosmtplib pass-through, one process, no filtering.

It accepts every message and forwards it to the downstream before answering, like the
relay, so the relay's overhead over plain "SMTP in, SMTP out" in Python is the ratio of
the two. ``--pool 0`` opens a downstream connection per message (``aiosmtplib.send``);
``--pool N`` keeps up to N idle downstream connections for reuse, as the relay does.

It also measures its own event-loop lag (a 10 ms ticker's overshoot) and writes it as
JSON to ``--stats`` on SIGTERM.

    python -m bench.passthrough --listen 127.0.0.1:2526 --downstream 127.0.0.1:2527
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
from pathlib import Path

import aiosmtplib
from aiosmtpd.smtp import SMTP, Envelope, Session

from relay.config import parse_hostport

LAG_TICK = 0.01


class Forwarder:
    """aiosmtpd handler: forward at DATA, answer with the downstream's verdict."""

    def __init__(self, host: str, port: int, pool: int) -> None:
        self.host = host
        self.port = port
        self.pool = pool
        self.idle: list[aiosmtplib.SMTP] = []
        self.forwarded = 0
        self.failed = 0

    async def _checkout(self) -> aiosmtplib.SMTP:
        while self.idle:
            client = self.idle.pop()
            if client.is_connected:
                return client
        client = aiosmtplib.SMTP(hostname=self.host, port=self.port, timeout=30)
        await client.connect()
        return client

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        sender = envelope.mail_from or ""
        data = envelope.original_content or b""
        try:
            if self.pool == 0:
                await aiosmtplib.send(
                    data,
                    sender=sender,
                    recipients=envelope.rcpt_tos,
                    hostname=self.host,
                    port=self.port,
                    timeout=30,
                )
            else:
                client = await self._checkout()
                try:
                    await client.sendmail(sender, envelope.rcpt_tos, data)
                except BaseException:
                    client.close()
                    raise
                if len(self.idle) < self.pool:
                    self.idle.append(client)
                else:
                    await client.quit()
        except aiosmtplib.SMTPResponseException as exc:
            self.failed += 1
            code = exc.code if 400 <= exc.code < 600 else 451
            return f"{code} {exc.message}"
        except (aiosmtplib.SMTPException, OSError):
            self.failed += 1
            return "451 4.4.0 Downstream unavailable"
        self.forwarded += 1
        return "250 2.0.0 Ok"


class LagMonitor:
    """How late a 10 ms ticker wakes up: the longest time the loop could not run."""

    def __init__(self) -> None:
        self.samples: list[float] = []

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(LAG_TICK)
            self.samples.append(max(0.0, loop.time() - before - LAG_TICK))

    def summary(self) -> dict[str, float]:
        if not self.samples:
            return {"loop_lag_max_ms": 0.0, "loop_lag_p99_ms": 0.0}
        ordered = sorted(self.samples)
        p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
        return {"loop_lag_max_ms": ordered[-1] * 1000, "loop_lag_p99_ms": p99 * 1000}


async def serve(
    listen: tuple[str, int], downstream: tuple[str, int], pool: int
) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    forwarder = Forwarder(*downstream, pool=pool)
    server = await loop.create_server(
        lambda: SMTP(forwarder, decode_data=False, hostname="passthrough.bench"),
        *listen,
        backlog=1024,
    )
    lag = LagMonitor()
    ticker = asyncio.create_task(lag.run())
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    ticker.cancel()
    server.close()
    for client in forwarder.idle:
        client.close()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(server.wait_closed(), 2.0)
    stats = lag.summary()
    stats["forwarded"] = forwarder.forwarded
    stats["failed"] = forwarder.failed
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="host:port to accept mail on")
    parser.add_argument("--downstream", required=True, help="host:port to forward to")
    parser.add_argument("--pool", type=int, default=16, help="idle downstream connections")
    parser.add_argument("--stats", type=Path, help="write loop-lag JSON here on exit")
    args = parser.parse_args()
    stats = asyncio.run(
        serve(parse_hostport(args.listen), parse_hostport(args.downstream), args.pool)
    )
    if args.stats is not None:
        args.stats.write_text(json.dumps(stats))


if __name__ == "__main__":
    main()

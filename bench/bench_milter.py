"""CPU per message of the milter door against the SMTP door, same relay, same policy, one
run (issue target: the milter path adds at most 10%).

One ``relay serve`` process listens on both doors ([milter] listen beside SMTP), with
authentication (loopback DNS, the bench's DKIM-signed message), the shipped model and the
default policy: what a site runs. Rounds alternate the doors so both see the same machine
state; each round sends ``--messages`` messages over ``--sessions`` concurrent sessions:
SMTP into the relay, which delivers into smtp-sink (the door's whole job, downstream
included); milter as Postfix speaks it (tests/support/miltermta.py: per message the
connect, HELO, envelope, header and body events, and the end-of-message round trip), the
relay answering with its header actions. The CPU is that of the relay's whole process
tree (its classifier and verification children included), from /proc.

  .venv/bin/python -m bench.bench_milter --out bench/results/milter.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.support.dnsserver import LocalDns
from tests.support.miltermta import MiltMta
from tests.support.relay import free_port

from bench import mail
from bench.client import drive
from bench.postfix import SmtpSink
from bench.procstats import cpu_seconds
from bench.servers import REPO, repo_relative, start_relay
from relay.message import split_fields, split_header_block


async def _milter_load(address: str, message: bytes, messages: int, sessions: int) -> float:
    """``messages`` milter sessions' worth of events over ``sessions`` connections; the
    elapsed seconds. Every message must be answered "continue" (delivered)."""
    head, body = split_header_block(message)
    headers = tuple(
        (name, value.removesuffix(b"\r\n")) for name, value in split_fields(head).fields
    )
    body = body.removeprefix(b"\r\n")
    remaining = messages

    async def one_connection() -> None:
        nonlocal remaining
        mta = await MiltMta.connect(address)
        await mta.negotiate()
        while remaining > 0:
            remaining -= 1
            result = await mta.message(
                mail_from=f"<{mail.SENDER}>",
                rcpts=(f"<{mail.RECIPIENT}>",),
                headers=headers,
                body=body,
                client=(mail.HELO, "127.0.0.1"),
                helo=mail.HELO,
            )
            if result.final != b"c":
                raise RuntimeError(f"milter answered {result}")
        await mta.close()

    start = time.perf_counter()
    await asyncio.gather(*(one_connection() for _ in range(sessions)))
    return time.perf_counter() - start


async def run(opts: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="relay-bench-milter-"))
    bench_mail = mail.build(work)
    sink = SmtpSink(work)
    dns = LocalDns({n: list(r) for n, r in bench_mail.zone.items()}).start()
    milter_port = free_port()
    overrides: dict[str, dict[str, Any]] = {
        "auth": {"enabled": True},
        "dns": {"nameservers": [dns.address], "timeout": 2},
        "policy": {"path": str(REPO / "config" / "policy.toml")},
        "model": {"enabled": True, "path": str(opts.model)},
        "milter": {"listen": f"inet:127.0.0.1:{milter_port}"},
    }
    rounds: list[dict[str, Any]] = []
    try:
        await sink.ready()
        relay = start_relay("relay", work / "relay", sink.port, workers=1, overrides=overrides)
        try:
            await relay.ready()
            # Warm-up: caches, the model's first calls, DNS.
            await drive(relay.port, bench_mail.message, messages=50, sessions=4, reuse=True)
            await _milter_load(f"127.0.0.1:{milter_port}", bench_mail.message, 50, 4)
            for i in range(opts.rounds):
                for door in ("smtp", "milter") if i % 2 == 0 else ("milter", "smtp"):
                    before = cpu_seconds(relay.tree())
                    if door == "smtp":
                        load = await drive(
                            relay.port,
                            bench_mail.message,
                            messages=opts.messages,
                            sessions=opts.sessions,
                            reuse=True,
                        )
                        if load.error_count:
                            raise RuntimeError(f"SMTP errors: {load.errors}")
                        elapsed = load.elapsed
                    else:
                        elapsed = await _milter_load(
                            f"127.0.0.1:{milter_port}",
                            bench_mail.message,
                            opts.messages,
                            opts.sessions,
                        )
                    cpu = cpu_seconds(relay.tree()) - before
                    rounds.append(
                        {
                            "round": i,
                            "door": door,
                            "messages": opts.messages,
                            "cpu_ms_per_msg": round(cpu * 1000 / opts.messages, 3),
                            "msgs_per_s": round(opts.messages / elapsed, 1),
                        }
                    )
        finally:
            relay.stop()
    finally:
        sink.stop()
        dns.stop()
        shutil.rmtree(work, ignore_errors=True)

    def summary(door: str) -> dict[str, float]:
        rows = [r for r in rounds if r["door"] == door]
        return {
            "cpu_ms_per_msg_median": round(statistics.median(r["cpu_ms_per_msg"] for r in rows), 3),
            "msgs_per_s_median": round(statistics.median(r["msgs_per_s"] for r in rows), 1),
        }

    smtp, milter = summary("smtp"), summary("milter")
    return {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "settings": {
            "messages_per_round": opts.messages,
            "sessions": opts.sessions,
            "rounds": opts.rounds,
            "model": repo_relative(opts.model),
            "policy": "config/policy.toml",
            "message_signed": bench_mail.signed,
        },
        "smtp": smtp,
        "milter": milter,
        "milter_over_smtp_cpu": round(
            milter["cpu_ms_per_msg_median"] / smtp["cpu_ms_per_msg_median"], 3
        ),
        "rounds": rounds,
    }


def render(result: dict[str, Any]) -> str:
    s, m = result["smtp"], result["milter"]
    lines = [
        "# Milter door against SMTP door (bench/bench_milter.py)",
        "",
        "One relay process, both doors, authentication + the shipped model + the default "
        f"policy; {result['settings']['rounds']} alternating rounds of "
        f"{result['settings']['messages_per_round']} messages over "
        f"{result['settings']['sessions']} sessions; CPU of the relay's whole process tree.",
        "",
        "| door | CPU ms/msg (median) | msgs/s (median) |",
        "|---|---:|---:|",
        f"| SMTP (delivering into smtp-sink) | {s['cpu_ms_per_msg_median']} | "
        f"{s['msgs_per_s_median']} |",
        f"| milter (header actions back to the MTA) | {m['cpu_ms_per_msg_median']} | "
        f"{m['msgs_per_s_median']} |",
        "",
        f"Milter CPU per message = {result['milter_over_smtp_cpu']}x the SMTP door's "
        "(target: at most 1.10x).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "spam.skops")
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "milter.json")
    opts = parser.parse_args()
    result = asyncio.run(run(opts))
    opts.out.write_text(json.dumps(result, indent=2) + "\n")
    opts.out.with_suffix(".md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()

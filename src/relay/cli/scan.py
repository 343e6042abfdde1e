"""`relay scan`: the facts and the Verdict for one message file, as JSON.

Uses the same registry, services (configured resolver, classifier, state) and policy
engine as the running relay, so what scan prints is what the relay would decide. The
envelope is not in a file: give it with --mail-from/--rcpt/--client-ip/--helo, otherwise
the Return-Path header and 127.0.0.1 stand in (SPF then says little). The message's time
is --time, else its own (newest Received, else Date; ``header_time``); a file with neither
is an error rather than a message arriving now, so a scan gives the same answer any day.

A scan changes nothing: the state store is opened read-only (the counts shown are the
live store's, plus this message as if it had arrived), no recorder runs and the key file
is only read, never created, so scanning a message never moves the running relay's
counters.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from email.utils import parseaddr
from pathlib import Path
from typing import Any

from relay.assembly import load_decider, open_services
from relay.config import Settings
from relay.errors import FactError, MessageTimeError, RelayError
from relay.facts import Facts, default_registry
from relay.message import Message, Peer
from relay.secretkey import SecretKey, load_key

log = logging.getLogger("relay.scan")


@dataclass(frozen=True, slots=True)
class ScanRequest:
    path: Path
    mail_from: str | None = None
    rcpt_to: tuple[str, ...] = ()
    client_ip: str = "127.0.0.1"
    helo: str | None = None
    facts: tuple[str, ...] = ()  # empty: every fact a live relay can know
    time: float | None = None  # Unix seconds; None: the message's own (header_time)


def _message(req: ScanRequest, data: bytes) -> Message:
    message = Message.from_file_bytes(
        data,
        received_at=req.time,
        rcpt_to=req.rcpt_to,
        peer=Peer(ip=req.client_ip, helo=req.helo),
    )
    mail_from = req.mail_from
    if mail_from is None:
        mail_from = parseaddr(message.header("return-path") or "")[1]
    return replace(message, envelope=replace(message.envelope, mail_from=mail_from))


def _scan_key(settings: Settings) -> SecretKey:
    """The relay's key, to read its keyed counts. A scan creates nothing: without a key
    file no relay has counted anything under it here, so a throwaway key reads the
    counts as empty (a relay sharing Redis from another host needs its key file here)."""
    path = settings.security.key_file
    if not path.exists():
        log.warning("%s does not exist: state counts read as empty", path)
        return SecretKey.generate()
    return load_key(path)


async def scan(settings: Settings, req: ScanRequest) -> dict[str, Any]:
    registry = default_registry()
    try:
        data = req.path.read_bytes()
    except OSError as exc:  # a missing file, a directory, no permission: say which
        raise RelayError(f"cannot read {req.path}: {exc.strerror or exc}") from None
    try:
        message = _message(req, data)
    except MessageTimeError as exc:
        raise MessageTimeError(f"{req.path}: {exc} with --time") from None
    async with contextlib.AsyncExitStack() as stack:
        services = await open_services(
            settings, stack, key=_scan_key(settings), readonly_state=True
        )
        decider = load_decider(settings, registry)
        facts = Facts(registry, message, services)
        verdict = await decider.decide(message, facts)
        names: Sequence[str] = req.facts or [s.name for s in registry if not s.lab_only]
        values: dict[str, Any] = {}
        for name in names:
            if name not in registry:
                raise FactError(f"unknown fact {name!r}")
            with contextlib.suppress(FactError):  # a failure is recorded with its reason
                await facts.get(name)
        reads = {r.name: r for r in facts.reads()}
        for name in names:
            r = reads[name]
            values[name] = {"error": r.error} if r.error else r.value
    return {
        "file": str(req.path),
        "envelope": {"mail_from": message.envelope.mail_from, "rcpt_to": list(req.rcpt_to)},
        "time": dt.datetime.fromtimestamp(message.received_at, dt.UTC).isoformat(),
        "facts": values,
        "verdict": verdict.to_dict(),
    }

"""`relay quarantine list|show|release|delete|reseal`: the command bodies.

The commands read the relay's key file (``[security] key_file``) and never create it: run
as another user than the relay, they would leave behind a key the relay cannot read.
Entries whose seal fails are refused with a QuarantineError (exit 2) and left as they are;
``list`` shows the good ones, names the refused ones on stderr and exits 1."""

from __future__ import annotations

import asyncio
import getpass
import json
import sys
import time
from collections.abc import Callable

from relay.assembly import build_transport
from relay.config import Settings
from relay.delivery.quarantine import QuarantineStore
from relay.errors import FeedbackRefused, QuarantineError
from relay.feedback.learn import Learner
from relay.feedback.store import open_feedback
from relay.reply import Reply
from relay.secretkey import load_key
from relay.smtp.relaycontrol import RelayControl


def release_check(settings: Settings) -> Callable[[str], Reply | None]:
    """Relay control for a release: the original client is unknown at release time (and
    meta.json could have been edited), so no network grants relaying: every recipient
    must be in ``[relay] domains``."""
    control = RelayControl(settings.relay.domains, networks=())

    def check(rcpt: str) -> Reply | None:
        judged = control.check(rcpt, "")
        return judged if isinstance(judged, Reply) else None

    return check


async def _command(settings: Settings, command: str, qid: str, as_json: bool, raw: bool) -> int:
    store = QuarantineStore(settings.quarantine.path, key=load_key(settings.security.key_file))
    out = sys.stdout
    if command == "list":
        listing = await store.list()
        entries = listing.entries
        for e in entries:
            if as_json:
                out.write(json.dumps(e.to_dict()) + "\n")
            else:
                stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(e.stored_at))
                rules = ",".join(e.rules) or "-"
                out.write(
                    f"{e.id}  {stamp}  {e.action:<10} {e.score:6.2f}  {e.size:>8}B  "
                    f"from=<{e.mail_from}> rcpts={len(e.rcpt_to)} rules={rules}\n"
                )
        if not as_json:
            out.write(f"{len(entries)} message(s) in {settings.quarantine.path}\n")
        for _, reason in listing.refused:
            print(f"refused: {reason}", file=sys.stderr)
        return 1 if listing.refused else 0
    if command == "show":
        entry, data = await store.show(qid)
        if raw:
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
        else:
            out.write(json.dumps(entry.to_dict(), indent=2) + "\n")
        return 0
    if command == "reseal":
        entry = await store.reseal(qid)
        out.write(json.dumps(entry.to_dict(), indent=2) + "\n")
        out.write(f"resealed {qid} as shown above: it can be released now\n")
        return 0
    if command == "delete":
        await store.delete(qid)
        out.write(f"deleted {qid}\n")
        return 0
    if command == "release":
        _, data = await store.show(qid)  # kept for the ham report: release removes it
        transport = build_transport(settings)
        try:
            result = await store.release(qid, transport, check=release_check(settings))
        finally:
            await transport.close()
        if result.removed and settings.feedback.ham_on_release:
            await _learn_ham(settings, data)
        for rcpt, reply in result.recipients:
            out.write(f"{rcpt}: {reply.line}\n")
        if result.reply is not None:
            out.write(f"data: {result.reply.line}\n")
        out.write("released and removed\n" if result.removed else "kept in quarantine\n")
        return 0 if result.reply is not None and result.reply.ok else 1
    raise QuarantineError(f"unknown quarantine command {command!r}")


async def _learn_ham(settings: Settings, data: bytes) -> None:
    """A released message was misjudged: record it as ham ([feedback] ham_on_release).
    A refusal is reported and does not undo the release."""
    store = await open_feedback(
        settings.state, settings.feedback, load_key(settings.security.key_file)
    )
    try:
        await Learner(store, authserv_id=settings.authserv_id).learn(
            data,
            action="ham",
            reporter=getpass.getuser(),
            source="quarantine-release",
            now=time.time(),
        )
        sys.stdout.write("recorded as ham feedback\n")
    except FeedbackRefused as exc:
        print(f"not recorded as ham feedback: {exc}", file=sys.stderr)
    finally:
        await store.close()


def run_command(settings: Settings, command: str, qid: str, *, as_json: bool, raw: bool) -> int:
    """Entry point of `relay quarantine list|show|release|delete|reseal`."""
    return asyncio.run(_command(settings, command, qid, as_json, raw))

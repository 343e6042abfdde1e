"""Quarantine: the exact raw message plus its Verdict and envelope, kept on disk.

One module because writing, listing, showing, releasing, resealing and deleting entries
share one on-disk layout and one seal; over 400 lines because release re-sends through
the transport and keeps refused recipients queued, and every read checks the seal.

Layout under ``[quarantine] path`` (default var/quarantine), one directory per entry:

    <id>/message.eml   the raw bytes exactly as the pipeline handed them over
    <id>/meta.json     envelope, peer, sha256 of the bytes, the Verdict (to_dict()) and
                       the seal: HMAC-SHA256 over everything else in the file

An entry is written into ``.tmp/<id>/``, each file fsynced, then renamed into place and
the directory fsynced, so a crash leaves either a whole entry or none. File I/O runs in a
thread, never on the event loop. Release re-sends through the normal transport; the entry
is removed once every recipient has it (recipients the downstream refused stay queued).

The seal is keyed with a subkey of the relay's secret key (``secretkey.py``), which lives
outside this folder: whoever can write here but cannot read the key cannot make an entry
that passes. It covers the metadata (id, envelope, peer, verdict) and the sha256 of the
bytes, so ``list`` refuses an entry whose metadata changed and ``show``/``release`` also
one whose bytes changed. Refused means a QuarantineError (``list``: reported beside the
good entries) and the entry left exactly as it is. Entries written before sealing (format
1) are refused the same way: their metadata cannot be trusted. After reading such an
entry's ``meta.json`` an operator may vouch for it with ``reseal`` (also the way to keep
entries across a key change; docs/operations.md).

Release still re-checks relay control on the stored recipients (the caller's ``check``),
so a sealed entry cannot deliver outside ``[relay] domains`` either. Recipients the check
refuses are reported with its reply, never sent, and stay in the entry.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay.contracts import Transport
from relay.durable import fsync_dir, write_new_file
from relay.errors import DeliveryError, QuarantineError
from relay.message import Envelope, Message, Peer, new_queue_id
from relay.reply import Reply
from relay.secretkey import SecretKey
from relay.verdict import Verdict

FORMAT_VERSION = 2  # 2: sealed (``_SEAL``); 1 had only the sha256, inside the same file
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # always fullmatch: "$" would let "id\n" through
_MESSAGE = "message.eml"
_META = "meta.json"
_SEAL = "hmac_sha256"
_SEAL_PURPOSE = "quarantine seal"
_UNSEALED = (
    "is not sealed (written before quarantine entries were signed, or the seal was "
    "removed), so its metadata cannot be trusted; read its meta.json, then delete it "
    "or vouch for it with `relay quarantine reseal {qid}` (docs/operations.md)"
)
_BAD_SEAL = (
    "failed its seal check: meta.json was changed, or the entry was sealed under another "
    "key ([security] key_file); nothing was done (docs/operations.md)"
)


@dataclass(frozen=True, slots=True)
class QuarantineEntry:
    """One quarantined message's metadata (the bytes are read separately)."""

    id: str
    queue_id: str
    stored_at: float
    received_at: float  # the arrival time the relay gave the message
    size: int
    sha256: str
    mail_from: str
    rcpt_to: tuple[str, ...]
    mail_options: tuple[str, ...]
    peer_ip: str
    peer_helo: str | None
    verdict: dict[str, Any]

    @property
    def action(self) -> str:
        return str(self.verdict.get("action", ""))

    @property
    def score(self) -> float:
        return float(self.verdict.get("score", 0.0))

    @property
    def rules(self) -> tuple[str, ...]:
        return tuple(str(r.get("rule", "")) for r in self.verdict.get("rules", []))

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "queue_id": self.queue_id,
            "stored_at": self.stored_at,
            "received_at": self.received_at,
            "size": self.size,
            "sha256": self.sha256,
            "envelope": {
                "mail_from": self.mail_from,
                "rcpt_to": list(self.rcpt_to),
                "mail_options": list(self.mail_options),
            },
            "peer": {"ip": self.peer_ip, "helo": self.peer_helo},
            "verdict": self.verdict,
        }


@dataclass(frozen=True, slots=True)
class QuarantineListing:
    """``list``'s answer: the entries that passed their seal check, oldest first, and the
    ones refused, each with the reason (never left out silently)."""

    entries: tuple[QuarantineEntry, ...]
    refused: tuple[tuple[str, str], ...]  # (id, reason)


# A recipient path -> the refusal, or None when it may be delivered (relay control at release).
RecipientCheck = Callable[[str], Reply | None]


@dataclass(frozen=True, slots=True)
class ReleaseResult:
    id: str
    recipients: tuple[tuple[str, Reply], ...]  # each recipient and the downstream's answer
    reply: Reply | None  # the answer to the message data; None when no recipient was taken
    removed: bool  # the entry is gone (every recipient has the message)


def _entry_from(meta: dict[str, Any]) -> QuarantineEntry:
    env = meta["envelope"]
    peer = meta.get("peer", {})
    return QuarantineEntry(
        id=str(meta["id"]),
        queue_id=str(meta.get("queue_id", "")),
        stored_at=float(meta["stored_at"]),
        received_at=float(meta["received_at"]),  # written by every version of the store
        size=int(meta["size"]),
        sha256=str(meta["sha256"]),
        mail_from=str(env["mail_from"]),
        rcpt_to=tuple(str(r) for r in env["rcpt_to"]),
        mail_options=tuple(str(o) for o in env.get("mail_options", [])),
        peer_ip=str(peer.get("ip", "")),
        peer_helo=peer.get("helo"),
        verdict=dict(meta.get("verdict", {})),
    )


STALE_TMP_SECONDS = 3600.0


def _file_clock_now(directory: Path) -> float:
    """Now, on the clock that stamps files in ``directory``: ages are measured against the
    mtimes' own clock (a file server's, on NFS), never against ours."""
    probe = directory / f".clock-{secrets.token_hex(8)}"
    probe.touch()
    try:
        return probe.stat().st_mtime
    finally:
        probe.unlink(missing_ok=True)


def _sealed_text(meta: dict[str, Any]) -> bytes:
    """What the seal covers: every field but the seal, in one canonical JSON form (sorted
    keys, no spaces, ASCII), so it does not depend on how the file was laid out."""
    body = {k: v for k, v in meta.items() if k != _SEAL}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


class QuarantineStore:
    """Implements contracts.Quarantine (``put``) plus list/show/release/delete/reseal.

    ``key`` is the relay's secret key; entries are sealed and checked with a subkey."""

    def __init__(self, root: Path, *, key: SecretKey) -> None:
        self.root = root
        self._seal_key = key.derive(_SEAL_PURPOSE)

    def _seal(self, meta: dict[str, Any]) -> str:
        return hmac.new(self._seal_key, _sealed_text(meta), hashlib.sha256).hexdigest()

    def _check_seal(self, qid: str, meta: dict[str, Any]) -> None:
        seal = meta.get(_SEAL)
        if not isinstance(seal, str):
            raise QuarantineError(f"quarantine entry {qid!r} " + _UNSEALED.format(qid=qid))
        expected = self._seal(meta).encode()
        if not hmac.compare_digest(seal.encode("utf-8", "surrogatepass"), expected):
            raise QuarantineError(f"quarantine entry {qid!r} " + _BAD_SEAL)

    def sweep_stale(self, older_than: float = STALE_TMP_SECONDS) -> int:
        """Remove half-written entries a crash left in .tmp/ (blocking; run at start-up).

        Only old ones: another relay process may be writing a fresh one right now."""
        tmp_root = self.root / ".tmp"
        if not tmp_root.is_dir():
            return 0
        removed = 0
        cutoff = _file_clock_now(tmp_root) - older_than
        for path in tmp_root.iterdir():
            try:
                if path.stat().st_mtime < cutoff:
                    shutil.rmtree(path, ignore_errors=True)
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    # --- blocking parts (run in a thread) ------------------------------------------------

    def _ensure_root(self) -> None:
        (self.root / ".tmp").mkdir(parents=True, exist_ok=True, mode=0o700)

    def _entry_dir(self, qid: str) -> Path:
        if not _ID.fullmatch(qid):
            raise QuarantineError(f"invalid quarantine id {qid!r}")
        return self.root / qid

    def _put_sync(self, message: Message, verdict: Verdict) -> str:
        self._ensure_root()
        qid = new_queue_id()
        meta = {
            "version": FORMAT_VERSION,
            "id": qid,
            "queue_id": message.queue_id,
            "stored_at": time.time(),
            "received_at": message.received_at,
            "size": message.size,
            "sha256": hashlib.sha256(message.raw).hexdigest(),
            "envelope": {
                "mail_from": message.envelope.mail_from,
                "rcpt_to": list(message.envelope.rcpt_to),
                "mail_options": list(message.envelope.mail_options),
                "smtputf8": message.envelope.smtputf8,
            },
            "peer": {
                "ip": message.peer.ip,
                "port": message.peer.port,
                "helo": message.peer.helo,
                "tls_version": message.peer.tls_version,
            },
            "verdict": verdict.to_dict(),
        }
        meta = json.loads(json.dumps(meta))  # seal exactly what a reader will load
        meta[_SEAL] = self._seal(meta)
        tmp = self.root / ".tmp" / qid
        tmp.mkdir(mode=0o700)
        try:
            write_new_file(tmp / _MESSAGE, message.raw)
            write_new_file(tmp / _META, json.dumps(meta, indent=1).encode())
            fsync_dir(tmp)
            tmp.rename(self.root / qid)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(self.root)
        return qid

    def _load_meta(self, qid: str) -> dict[str, Any]:
        """meta.json as it is on disk, not yet checked: only ``reseal`` uses it so."""
        path = self._entry_dir(qid) / _META
        try:
            meta = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise QuarantineError(f"no quarantined message {qid!r}") from None
        except (OSError, ValueError) as exc:
            raise QuarantineError(f"quarantine entry {qid!r} is unreadable: {exc}") from None
        if not isinstance(meta, dict):
            raise QuarantineError(f"quarantine entry {qid!r} has invalid metadata")
        return meta

    def _read_meta(self, qid: str) -> dict[str, Any]:
        """meta.json once its seal holds; the id inside must be the folder's name, so a
        sealed entry moved to another id is refused too."""
        meta = self._load_meta(qid)
        self._check_seal(qid, meta)
        if meta.get("id") != qid:
            raise QuarantineError(f"quarantine entry {qid!r} has invalid metadata")
        return meta

    def _write_meta(self, qid: str, meta: dict[str, Any]) -> None:
        """Seal ``meta`` and replace the entry's meta.json with it atomically."""
        meta = {**meta, "version": FORMAT_VERSION}
        meta[_SEAL] = self._seal(meta)
        path = self._entry_dir(qid)
        tmp = path / f"{_META}.tmp"
        tmp.unlink(missing_ok=True)
        write_new_file(tmp, json.dumps(meta, indent=1).encode())
        tmp.replace(path / _META)
        fsync_dir(path)

    def _show_sync(self, qid: str) -> tuple[QuarantineEntry, bytes]:
        return self._checked(qid, self._read_meta(qid))

    def _checked(self, qid: str, meta: dict[str, Any]) -> tuple[QuarantineEntry, bytes]:
        """The entry and its bytes, which must match the sha256 in ``meta``."""
        try:
            entry = _entry_from(meta)
            raw = (self._entry_dir(qid) / _MESSAGE).read_bytes()
        except (KeyError, TypeError, ValueError) as exc:
            raise QuarantineError(f"quarantine entry {qid!r} has invalid metadata: {exc}") from None
        except OSError as exc:
            raise QuarantineError(f"quarantine entry {qid!r} is unreadable: {exc}") from None
        if hashlib.sha256(raw).hexdigest() != entry.sha256:
            raise QuarantineError(
                f"quarantine entry {qid!r}: message.eml was modified (sha256 mismatch); "
                "nothing was done"
            )
        return entry, raw

    def _list_sync(self) -> QuarantineListing:
        if not self.root.is_dir():
            return QuarantineListing((), ())
        entries: list[QuarantineEntry] = []
        refused: list[tuple[str, str]] = []
        for child in self.root.iterdir():
            if child.name.startswith(".") or not _ID.fullmatch(child.name):
                continue
            if not (child / _META).exists():
                continue  # not an entry
            try:
                entries.append(_entry_from(self._read_meta(child.name)))
            except QuarantineError as exc:  # one bad entry must not hide the others
                refused.append((child.name, str(exc)))
            except (KeyError, TypeError, ValueError) as exc:
                refused.append((child.name, f"quarantine entry {child.name!r}: bad field {exc}"))
        return QuarantineListing(
            tuple(sorted(entries, key=lambda e: (e.stored_at, e.id))), tuple(sorted(refused))
        )

    def _delete_sync(self, qid: str) -> None:
        path = self._entry_dir(qid)
        if not (path / _META).exists():
            raise QuarantineError(f"no quarantined message {qid!r}")
        # Rename first so a half-deleted entry never looks like a whole one.
        trash = self.root / ".tmp" / f"del-{qid}"
        self._ensure_root()
        path.rename(trash)
        shutil.rmtree(trash)
        fsync_dir(self.root)

    def _keep_only_sync(self, qid: str, recipients: tuple[str, ...]) -> None:
        """Rewrite an entry's recipients (after a partial release), sealed, atomically."""
        meta = self._read_meta(qid)
        meta["envelope"]["rcpt_to"] = list(recipients)
        self._write_meta(qid, meta)

    def _reseal_sync(self, qid: str) -> QuarantineEntry:
        """Seal an entry as it stands: the operator vouches for its meta.json (an entry
        from before sealing, or one sealed under a replaced key). Its bytes must still
        match the sha256 in it; anything else about it is taken as written."""
        meta = self._load_meta(qid)
        if meta.get("id") != qid:
            raise QuarantineError(f"quarantine entry {qid!r} has invalid metadata")
        entry, _ = self._checked(qid, meta)
        self._write_meta(qid, meta)
        return entry

    # --- async API -----------------------------------------------------------------------

    async def put(self, message: Message, verdict: Verdict) -> str:
        try:
            return await asyncio.to_thread(self._put_sync, message, verdict)
        except OSError as exc:
            raise QuarantineError(f"cannot store in quarantine: {exc.strerror}") from exc

    async def list(self) -> QuarantineListing:
        """Entries whose seal holds, and the refused ones with their reasons."""
        return await asyncio.to_thread(self._list_sync)

    async def show(self, qid: str) -> tuple[QuarantineEntry, bytes]:
        """The entry and its bytes; QuarantineError unless seal and sha256 both hold."""
        return await asyncio.to_thread(self._show_sync, qid)

    async def reseal(self, qid: str) -> QuarantineEntry:
        """Seal an entry as it stands on disk (see ``_reseal_sync``)."""
        return await asyncio.to_thread(self._reseal_sync, qid)

    async def delete(self, qid: str) -> None:
        await asyncio.to_thread(self._delete_sync, qid)

    async def release(
        self, qid: str, transport: Transport, *, check: RecipientCheck
    ) -> ReleaseResult:
        """Deliver an entry through ``transport``; remove it once every recipient has it.

        ``check`` judges each stored recipient first (relay control); the ones it refuses
        are answered with its reply, not sent, and kept in the entry. An entry whose seal
        or sha256 fails raises QuarantineError before anything is sent."""
        entry, raw = await self.show(qid)
        judged = [(r, check(r)) for r in entry.rcpt_to]
        denied = [(r, refusal) for r, refusal in judged if refusal is not None]
        allowed = tuple(r for r, refusal in judged if refusal is None)
        message = Message(
            raw=raw,
            envelope=Envelope(entry.mail_from, allowed, entry.mail_options),
            peer=Peer(ip=entry.peer_ip, helo=entry.peer_helo),
            queue_id=entry.queue_id or qid,
            received_at=entry.received_at,  # released mail keeps its arrival time
        )
        if not allowed:
            return ReleaseResult(qid, tuple(denied), None, False)
        options = [o for o in entry.mail_options if o.upper().split("=", 1)[0] in ("SIZE", "BODY")]
        transaction = await transport.begin(entry.mail_from, options)
        answers: list[tuple[str, Reply]] = []
        for rcpt in allowed:
            answers.append((rcpt, await transaction.add_recipient(rcpt)))
        refused = tuple(r for r, reply in answers if not reply.ok)
        answers.extend(denied)
        refused += tuple(r for r, _ in denied)
        if len(refused) == len(answers):
            await transaction.abort()
            return ReleaseResult(qid, tuple(answers), None, False)
        try:
            reply = await transaction.send(message)
        except DeliveryError as exc:
            return ReleaseResult(qid, tuple(answers), Reply(exc.code, exc.status, exc.text), False)
        if refused:
            await asyncio.to_thread(self._keep_only_sync, qid, refused)
            return ReleaseResult(qid, tuple(answers), reply, False)
        await self.delete(qid)
        return ReleaseResult(qid, tuple(answers), reply, True)

"""The relay's secret key: one small file, kept outside the quarantine folder.

It keys two things, each with its own derived subkey (``SecretKey.derive``), so a value
made for one use can never pass for the other:

- the address hashes in the state store (``state.py``): whoever reads the SQLite file or
  the shared Redis cannot confirm a guessed address by hashing it;
- the seal (HMAC-SHA256) over each quarantine entry's metadata and the digest of its
  bytes (``delivery/quarantine.py``): an edited ``meta.json`` or ``message.eml`` is refused.

``load_key(path, create=True)`` is the relay's start: a missing file is created with 32
random bytes, owner-only (0600), complete before it appears (written under a temporary
name, fsynced, then hard-linked into place, which fails rather than replace a key another
worker created meanwhile and already uses). Tools (``relay quarantine``, ``relay scan``)
never create it: run as another user they would leave a key the relay cannot read.

Like ssh with a private key, a file that group or others may read or write is refused,
not tightened: someone may have read it already, and only the operator can judge that.

The key never appears in a repr, a log line or an error message. Imports only errors
and durable.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from relay.durable import fsync_dir
from relay.errors import ConfigError

KEY_BYTES = 32
_MAX_BYTES = 4096  # a longer file is not a key file (a wrong path, most likely)
PRIVATE_MODE = 0o600


@dataclass(frozen=True, slots=True, eq=False)
class SecretKey:
    """Key material (never in a repr); use it only through ``derive``."""

    material: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.material) < KEY_BYTES:
            raise ValueError(f"a secret key has at least {KEY_BYTES} bytes")

    @classmethod
    def generate(cls) -> SecretKey:
        """A fresh random key (tests, and the lab's private throwaway store)."""
        return cls(secrets.token_bytes(KEY_BYTES))

    def derive(self, purpose: str) -> bytes:
        """A 32-byte subkey for one purpose: HMAC-SHA256 of the purpose's name."""
        label = b"relay secret key v1: " + purpose.encode("ascii")
        return hmac.new(self.material, label, hashlib.sha256).digest()


def _fail(path: Path, reason: str) -> ConfigError:
    return ConfigError(str(path), "", f"{reason} ([security] key_file; docs/operations.md)")


def load_key(path: Path, *, create: bool = False) -> SecretKey:
    """The key in ``path``; with ``create``, a missing file is made first. ConfigError
    names the file and what to do; it never holds key bytes."""
    try:
        return _read(path)
    except FileNotFoundError:
        if not create:
            missing = "the key file does not exist (the relay creates it when it starts)"
            raise _fail(path, missing) from None
    _create(path)
    try:
        return _read(path)
    except FileNotFoundError:
        raise _fail(path, "the key file vanished right after it was created") from None


def _read(path: Path) -> SecretKey:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not hang the start
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _fail(path, f"cannot open the key file: {exc.strerror}") from None
    try:
        st = os.fstat(fd)  # the file opened, not whatever the path names now
        if not stat.S_ISREG(st.st_mode):
            raise _fail(path, "the key file is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise _fail(
                path,
                f"the key file is open to group or others (mode {mode:04o}); a key others "
                f"could read lets them forge quarantine entries: chmod 600 {path}, and make "
                "a new key if someone may have read it",
            )
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(_MAX_BYTES + 1)
    finally:
        os.close(fd)
    if not KEY_BYTES <= len(data) <= _MAX_BYTES:
        size = f"{len(data)}" if len(data) <= _MAX_BYTES else f"more than {_MAX_BYTES}"
        raise _fail(
            path, f"the key file holds {size} bytes; a key holds {KEY_BYTES} to {_MAX_BYTES}"
        )
    return SecretKey(data)


def _create(path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_bytes(KEY_BYTES))
                fh.flush()
                os.fsync(fh.fileno())
            # link, not replace: two workers starting together must end with one key.
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(path.parent)
    except OSError as exc:
        raise _fail(path, f"cannot create the key file: {exc.strerror}") from None

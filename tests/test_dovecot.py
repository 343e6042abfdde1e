"""deploy/dovecot/ against a real Dovecot (Debian dovecot-imapd + dovecot-sieve): moving a
message into Junk over IMAP makes the relay learn it as spam, moving it out again as ham,
moving it to the Trash teaches nothing.

Dovecot runs from a private configuration in a scratch directory (its own base_dir, a
passwd-file user, Maildir, loopback IMAP on a free port, plain text login) built from the
shipped snippet, scripts and pipe programs with only their marked paths substituted, and
the pipe programs call the real ``relay learn`` on a scratch relay configuration."""

from __future__ import annotations

import contextlib
import imaplib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay.secretkey import load_key

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "dovecot"
CORPUS = ROOT.parent / "shared" / "corpora" / "modern-dev" / "modern-dev.tar.gz"
SBIN = "/usr/sbin:/usr/bin:/sbin:/bin"
USER, PASSWORD = "alice", "imap-secret"


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=SBIN)


def _binaries() -> tuple[str, str, str] | None:
    found = (_which("dovecot"), _which("sievec"), _which("doveadm"))
    if None in found:
        return None
    dovecot, sievec, doveadm = found
    assert dovecot and sievec and doveadm
    return dovecot, sievec, doveadm


def _dovecot_or_skip() -> tuple[str, str, str]:
    """The Dovecot binaries; installed with ``make system-deps`` when missing and we may."""
    found = _binaries()
    if found is not None:
        return found
    if os.geteuid() != 0 or _which("apt-get") is None:
        pytest.skip("dovecot/sievec missing and not root to install them: run `make system-deps`")
    done = subprocess.run(
        ["make", "-C", str(ROOT), "system-deps"], capture_output=True, text=True, timeout=900
    )
    found = _binaries()
    if found is None:
        pytest.skip(f"dovecot/sievec could not be installed: {done.stderr[-500:]!r}")
    return found


def _real_clock(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` without libfaketime (make unit-future). Dovecot clears its children's
    environment, so the pipe programs would run on the real clock anyway; the test's own
    ``relay learn --stats`` runs on it too, so one store sees one clock."""
    preload = [p for p in re.split(r"[:\s]+", env.get("LD_PRELOAD", "")) if "faketime" not in p]
    kept = {k: v for k, v in env.items() if not k.startswith("FAKETIME")}
    return {**kept, "LD_PRELOAD": " ".join(preload)}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(
    predicate: Callable[[], bool], what: str, why: Callable[[], str], seconds: float = 30
) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {seconds:.0f}s\n{why()}")
        time.sleep(0.1)


@dataclass(frozen=True)
class Accounts:
    """Who runs what: Dovecot refuses mail users with uid 0, so as root the mailbox
    belongs to ``nobody`` while the pipe programs run as root (the relay's user here);
    otherwise everything runs as the current user (Dovecot's non-root mode)."""

    mail_uid: int
    mail_gid: int
    internal_user: str
    login_user: str
    learn_user: str
    as_root: bool


def _accounts() -> Accounts:
    me = pwd.getpwuid(os.getuid())
    if os.geteuid() != 0:
        return Accounts(me.pw_uid, me.pw_gid, me.pw_name, me.pw_name, me.pw_name, False)
    try:
        nobody = pwd.getpwnam("nobody")
        pwd.getpwnam("dovecot")
        pwd.getpwnam("dovenull")
    except KeyError as exc:
        pytest.fail(f"user {exc} missing: the Debian dovecot-core package creates dovecot/dovenull")
    return Accounts(nobody.pw_uid, nobody.pw_gid, "dovecot", "dovenull", me.pw_name, True)


def _relay_config(tmp: Path) -> Path:
    config = tmp / "relay.toml"
    config.write_text(
        "\n".join(
            [
                "[smtp]",
                'listen = "127.0.0.1:0"',
                'hostname = "relay.test"',
                "[relay]",
                'domains = ["example.org"]',
                "networks = []",
                "[delivery]",
                'mode = "maildir"',
                f"maildir = {json.dumps(str(tmp / 'maildir'))}",
                "[model]",
                "enabled = false",
                "[policy]",
                'path = ""',
                "[metrics]",
                "enabled = false",
                "[auth]",
                "enabled = false",
                "[state]",
                'backend = "sqlite"',
                f"path = {json.dumps(str(tmp / 'state.sqlite3'))}",
                "[quarantine]",
                f"path = {json.dumps(str(tmp / 'quarantine'))}",
                "[security]",
                f"key_file = {json.dumps(str(tmp / 'relay.key'))}",
                "",
            ]
        )
    )
    load_key(tmp / "relay.key", create=True)  # as `relay serve` does on its first start
    return config


def _substitute(text: str, replacements: Mapping[str, str], name: str) -> str:
    for old, new in replacements.items():
        assert old in text, f"deploy/dovecot/{name} no longer contains {old!r}: update the test"
        text = text.replace(old, new)
    return text


def _install_deploy_files(work: Path, relay_config: Path, relay_dir: Path, learn_user: str) -> str:
    """Copies deploy/dovecot/ into ``work`` with its marked paths substituted; returns the
    plugin/service snippet to include in the test's dovecot.conf."""
    sieve_dir, bin_dir = work / "sieve", work / "bin"
    sieve_dir.mkdir()
    bin_dir.mkdir()
    shim = bin_dir / "relay"  # the real CLI, run by this interpreter
    shim.write_text(f'#!/bin/sh\nexec {json.dumps(sys.executable)} -m relay.cli "$@"\n')
    shim.chmod(0o755)
    for kind in ("spam", "ham"):
        shutil.copy(DEPLOY / f"report-{kind}.sieve", sieve_dir)
        program = bin_dir / f"relay-learn-{kind}.sh"
        program.write_text(
            _substitute(
                (DEPLOY / f"relay-learn-{kind}.sh").read_text(),
                {
                    "RELAY=/opt/relay/bin/relay": f"RELAY={shim}",
                    "RELAY_CONFIG=/etc/relay/relay.toml": f"RELAY_CONFIG={relay_config}",
                    "RELAY_DIR=/var/lib/relay": f"RELAY_DIR={relay_dir}",
                },
                program.name,
            )
        )
        program.chmod(0o755)
    return _substitute(
        (DEPLOY / "90-relay-imapsieve.conf").read_text(),
        {
            "/etc/dovecot/sieve/relay/": f"{sieve_dir}/",
            "/usr/local/lib/relay/dovecot/": f"{bin_dir}/",
            "user = relay\n": f"user = {learn_user}\n",
        },
        "90-relay-imapsieve.conf",
    )


def _dovecot_conf(work: Path, port: int, accounts: Accounts, snippet: str) -> Path:
    passwd = work / "passwd"
    home = work / "home"
    passwd.write_text(
        f"{USER}:{{PLAIN}}{PASSWORD}:{accounts.mail_uid}:{accounts.mail_gid}::{home}::\n"
    )
    passwd.chmod(0o644)
    chroot = "" if accounts.as_root else "  chroot =\n"
    conf = work / "dovecot.conf"
    conf.write_text(
        f"""\
base_dir = {work / "run"}
state_dir = {work / "state"}
instance_name = relay-test-{port}
log_path = {work / "dovecot.log"}
info_log_path = {work / "dovecot.log"}
listen = 127.0.0.1
protocols = imap
ssl = no
auth_mechanisms = plain
disable_plaintext_auth = no
default_internal_user = {accounts.internal_user}
default_login_user = {accounts.login_user}
first_valid_uid = 1
mail_location = maildir:{work / "mail"}/%u
service imap-login {{
{chroot}  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service anvil {{
{chroot}}}
passdb {{
  driver = passwd-file
  args = {passwd}
}}
userdb {{
  driver = passwd-file
  args = {passwd}
}}
namespace inbox {{
  inbox = yes
  mailbox Junk {{
    special_use = \\Junk
    auto = create
  }}
  mailbox Trash {{
    special_use = \\Trash
    auto = create
  }}
}}

{snippet}
"""
    )
    return conf


@contextlib.contextmanager
def _running_dovecot(dovecot: str, conf: Path, port: int, log: Path) -> Iterator[None]:
    with (log.parent / "dovecot.stderr").open("wb") as stderr:
        proc = subprocess.Popen(
            [dovecot, "-F", "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=_real_clock(os.environ),
            start_new_session=True,  # its own process group, so teardown reaches every child
        )

    def accepting() -> bool:
        assert proc.poll() is None, f"dovecot exited early:\n{_log_tail(log)}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
                return conn.recv(64).startswith(b"* OK")
        except OSError:
            return False

    try:
        _wait(accepting, "dovecot IMAP greeting", lambda: _log_tail(log))
        yield
    finally:
        proc.terminate()  # the master stops its children before it exits
        try:
            proc.wait(timeout=20)
        finally:
            # A pipe program still running (a hung learn) would outlive the master.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _log_tail(log: Path) -> str:
    text = log.read_text(errors="replace") if log.exists() else "(no dovecot log)"
    stderr = log.parent / "dovecot.stderr"
    if stderr.exists():
        text += stderr.read_text(errors="replace")
    return "dovecot log:\n" + "\n".join(text.splitlines()[-30:])


def _message() -> bytes:
    """One real spam message from the modern-dev corpus when it is there, else a made-up one."""
    if CORPUS.exists():
        with tarfile.open(CORPUS) as tar:
            for member in tar:
                if member.isfile() and "/spam/" in member.name:
                    data = tar.extractfile(member)
                    if data is not None:
                        return data.read()
    return _synthetic("<imapsieve-1@example.net>")


def _synthetic(message_id: str) -> bytes:
    return (
        "From: Prize Desk <winner@example.net>\r\n"
        "To: alice@example.org\r\n"
        "Subject: You have won\r\n"
        "Date: Mon, 07 Dec 2026 10:00:00 +0000\r\n"
        f"Message-ID: {message_id}\r\n"
        "\r\n"
        "Claim your prize now.\r\n"
    ).encode()


class Relay:
    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log

    def stats(self) -> dict[str, int]:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "relay.cli",
                "learn",
                "--stats",
                "--json",
                "--config",
                str(self.config),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=_real_clock(os.environ),
        )
        assert done.returncode == 0, (
            f"`relay learn --stats --json` exited {done.returncode} (is `relay learn` there?)\n"
            f"{done.stderr[-2000:]}"
        )
        doc = json.loads(done.stdout)
        assert isinstance(doc, dict)
        return {key: int(doc[key]) for key in ("spam", "ham", "entries")}

    def wait_for(self, spam: int, ham: int) -> None:
        seen: list[dict[str, int]] = []

        def reached() -> bool:
            seen.append(self.stats())
            return seen[-1]["spam"] == spam and seen[-1]["ham"] == ham

        _wait(
            reached,
            f"learned spam={spam} ham={ham}",
            lambda: f"last stats {seen[-1] if seen else None}\n{_log_tail(self.log)}",
        )


def _ok(answer: tuple[str, Sequence[object]], what: str) -> list[object]:
    typ, data = answer
    assert typ == "OK", f"IMAP {what}: {typ} {data!r}"
    return list(data)


def _move_all(imap: imaplib.IMAP4, source: str, target: str) -> None:
    _ok(imap.select(source), f"SELECT {source}")
    _ok(imap.uid("MOVE", "1:*", target), f"MOVE {source} -> {target}")


def _count(imap: imaplib.IMAP4, mailbox: str) -> int:
    data = _ok(imap.status(mailbox, "(MESSAGES)"), f"STATUS {mailbox}")
    match = re.search(rb"MESSAGES (\d+)", data[0] if isinstance(data[0], bytes) else b"")
    assert match, data
    return int(match.group(1))


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Not tmp_path: as root the mailbox belongs to `nobody`, who cannot enter pytest's
    # 0700 directories; and unix socket paths must stay short.
    work = Path(tempfile.mkdtemp(prefix="relay-dovecot-"))
    work.chmod(0o755)
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_imapsieve_moves_teach_the_relay(workdir: Path, tmp_path: Path) -> None:
    dovecot, sievec, _ = _dovecot_or_skip()
    accounts = _accounts()
    relay_dir = tmp_path / "relay"
    relay_dir.mkdir()
    relay = Relay(_relay_config(relay_dir), workdir / "dovecot.log")
    assert relay.stats() == {"spam": 0, "ham": 0, "entries": 0}

    snippet = _install_deploy_files(workdir, relay.config, relay_dir, accounts.learn_user)
    port = _free_port()
    conf = _dovecot_conf(workdir, port, accounts, snippet)
    (workdir / "mail").mkdir()
    (workdir / "home").mkdir()
    for path in (workdir / "mail", workdir / "home"):
        os.chown(path, accounts.mail_uid, accounts.mail_gid)
    for script in sorted((workdir / "sieve").glob("*.sieve")):
        done = subprocess.run(
            [sievec, "-c", str(conf), str(script)], capture_output=True, text=True
        )
        assert done.returncode == 0, f"sievec {script.name}: {done.stdout}{done.stderr}"

    with _running_dovecot(dovecot, conf, port, workdir / "dovecot.log"):
        imap = imaplib.IMAP4("127.0.0.1", port, timeout=30)
        try:
            _ok(imap.login(USER, PASSWORD), "LOGIN")
            _ok(imap.append("INBOX", "", None, _message()), "APPEND INBOX")
            assert relay.stats()["entries"] == 0  # landing in the INBOX teaches nothing

            _move_all(imap, "INBOX", "Junk")
            relay.wait_for(spam=1, ham=0)

            _move_all(imap, "Junk", "INBOX")
            relay.wait_for(spam=0, ham=1)  # the same message, relabelled

            # Deleting spam is not calling it ham: Junk -> Trash learns nothing. A client
            # uploading straight into Junk (APPEND) does; once that second report is in,
            # the Trash move (an earlier command in the same session) has had its turn.
            _move_all(imap, "INBOX", "Junk")
            relay.wait_for(spam=1, ham=0)
            _move_all(imap, "Junk", "Trash")
            _ok(
                imap.append("Junk", "", None, _synthetic("<imapsieve-2@example.net>")),
                "APPEND Junk",
            )
            relay.wait_for(spam=2, ham=0)
            assert relay.stats()["entries"] == 2
            assert (_count(imap, "INBOX"), _count(imap, "Junk"), _count(imap, "Trash")) == (0, 1, 1)
            imap.logout()
        finally:
            with contextlib.suppress(OSError, imaplib.IMAP4.error):
                imap.shutdown()
        log = (workdir / "dovecot.log").read_text(errors="replace")
        assert " Error: " not in log, _log_tail(workdir / "dovecot.log")

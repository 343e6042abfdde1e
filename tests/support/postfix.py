"""A real, private Postfix for end-to-end tests (Debian's postfix package, 3.4 or later).

Usage (a module-scoped fixture is the cheap way: one instance shared by a module's tests;
tests/test_postfix_placements.py is a complete example)::

    from tests.support.postfix import (
        Postfix, ThreadedSink, free_port, postfix_or_skip, running_postfix, send
    )

    @pytest.fixture(scope="module")
    def mta() -> Iterator[tuple[Postfix, ThreadedSink]]:
        postfix_or_skip()                       # skips when not installed or not root
        milter_port = free_port()
        with ThreadedSink() as sink, running_postfix(
            "milter",                           # short name: syslog_name, myhostname
            relayhost=sink.address,             # every delivery goes here (IP:port)
            main={"milter_default_action": "tempfail"},        # main.cf additions/overrides
            smtpd_options={"smtpd_milters": f"inet:127.0.0.1:{milter_port}"},  # public smtpd -o
            master="127.0.0.1:10026 inet n - n - - smtpd\n  -o smtpd_milters=\n",  # appended
        ) as postfix:
            yield postfix, sink                 # postfix.port: the public smtpd

    async def test_x(mta: tuple[Postfix, ThreadedSink]) -> None:
        postfix, sink = mta
        result = await send(postfix.port, ["bob@example.org"], data, client_ip="127.0.0.2")
        assert result.code == 250, f"{result}\n{postfix.log_tail()}"   # SmtpResult, never raises
        await postfix.wait_log(rf"{result.queue_id}: to=<bob@example.org>.*status=sent")
        got = await sink.wait_for_match(lambda m: b"Subject: x" in m.data, "my message")
        postfix.queue()      # postqueue -j, parsed; postfix.flush() is postqueue -f
        postfix.command("sendmail", "-f", "a@b.test", "bob@example.org", input_text="...")

Clients: ``send(..., client_ip=...)`` picks the source address (any 127/8 address works on
Linux): 127.0.0.1 is the instance's ``mynetworks``, anything else is "the Internet".
``running_postfix(..., port=P, default_smtpd=False)`` when ``master`` defines the public
smtpd itself (a shipped snippet); ``base_main_cf`` shows every default.

The instance lives in its own directory (``mkdtemp``, 0755 so the ``postfix`` user can enter
it; pytest's 0700 tmp_path would not do): its own main.cf/master.cf, queue_directory,
data_directory, syslog_name and ``maillog_file`` (``postfix.log``, read by ``log()``), its
public smtpd on a free loopback port, no DNS at all (``smtp_dns_support_level = disabled``,
``smtp_host_lookup = native``, IP-literal next hops), ``mydestination`` empty,
``relay_domains = example.org``, every delivery to ``relayhost`` (the sink), and queue timers
of a second or two, so deferred mail is retried (and visible) fast.

``main`` entries override the defaults of ``base_main_cf``; ``master`` is appended to the
base master.cf verbatim (the services a placement adds); ``smtpd_options`` become ``-o``
lines of the public smtpd. Started with ``postfix -c DIR check`` (creates the queue
subdirectories owned by ``postfix``/``postdrop`` the way a package install would) and
``postfix -c DIR start-fg``; stopped with ``postfix -c DIR stop``, then the process groups
are killed, so nothing outlives a test. The system instance is never started, stopped or
configured: its main.cf/master.cf are not read (only the package's file list in
``meta_directory``, as ``postfix check`` needs). Postfix runs without libfaketime (``make
unit-future``): its daemons drop LD_PRELOAD anyway (``import_environment``), and its
commands and queue timers should see the real clock.

Root is needed (master binds as root and drops to ``mail_owner``): ``postfix_or_skip``
skips with a reason otherwise. Two instances can run side by side: nothing is shared but
the binaries (``multi_instance_directories`` is not used).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP

from tests.support.ports import free_port as free_port  # re-exported
from tests.support.ports import free_ports as free_ports
from tests.support.relay import Received, Sink

SBIN = "/usr/sbin:/usr/bin:/sbin:/bin"
DEPLOY_POSTFIX = Path(__file__).resolve().parents[2] / "deploy" / "postfix"

# The services every instance needs (Debian's master.cf, chroot off: a chroot would need
# copies of /etc files inside the scratch directory). The public smtpd is added per
# instance; postlog is what makes maillog_file work (Postfix 3.4+).
BASE_MASTER_CF = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=SBIN)


def postfix_or_skip() -> str:
    """The ``postfix`` command; skips the test when Postfix is missing or we are not root."""
    found = _which("postfix")
    if found is None or _which("postqueue") is None:
        pytest.skip("Postfix is not installed: run `make system-deps` (as root)")
    if os.geteuid() != 0:
        pytest.skip("a private Postfix instance must be started as root (CI runs as root)")
    return found


def real_clock_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: ours) without libfaketime and without MAIL_CONFIG (which would
    point Postfix's commands at another configuration)."""
    env = os.environ if env is None else env
    preload = [p for p in re.split(r"[:\s]+", env.get("LD_PRELOAD", "")) if "faketime" not in p]
    kept = {
        k: v
        for k, v in env.items()
        if not k.startswith("FAKETIME") and k not in ("LD_PRELOAD", "MAIL_CONFIG")
    }
    if any(preload):
        kept["LD_PRELOAD"] = " ".join(p for p in preload if p)
    kept["PATH"] = f"{SBIN}:{env.get('PATH', '')}"
    return kept


def base_main_cf(root: Path, name: str, relayhost: str) -> dict[str, str]:
    """The main.cf of a private instance under ``root`` (see the module docstring)."""
    return {
        "compatibility_level": "3.6",
        "queue_directory": str(root / "queue"),
        "data_directory": str(root / "data"),
        "syslog_name": f"postfix-{name}",
        "maillog_file": str(root / "postfix.log"),
        "maillog_file_prefixes": str(root),
        "myhostname": f"{name}.postfix.test",
        "mydomain": "postfix.test",
        "myorigin": "$myhostname",
        "inet_interfaces": "loopback-only",
        "inet_protocols": "ipv4",
        "mydestination": "",
        "local_recipient_maps": "",
        "alias_maps": "",
        "alias_database": "",
        "relay_domains": "example.org",
        "relayhost": f"[{relayhost.rpartition(':')[0]}]:{relayhost.rpartition(':')[2]}",
        # Only 127.0.0.1 is "our network"; tests send as an Internet client from 127.0.0.2.
        "mynetworks": "127.0.0.1/32",
        # What a production main.cf has (the 3.x default defers instead of rejecting).
        "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
        "smtp_dns_support_level": "disabled",
        "smtp_host_lookup": "native",
        "smtpd_peername_lookup": "no",
        "biff": "no",
        "append_dot_mydomain": "no",
        # Fast, visible retries: deferred mail comes back within a second or two.
        "queue_run_delay": "1s",
        "minimal_backoff_time": "1s",
        "maximal_backoff_time": "2s",
        "maximal_queue_lifetime": "1d",
        "bounce_queue_lifetime": "1d",
        "in_flow_delay": "0",
        "smtpd_error_sleep_time": "0",
        "smtp_connect_timeout": "5s",
        "smtpd_banner": "$myhostname ESMTP",
    }


def snippet(name: str, replacements: Mapping[str, str]) -> str:
    """A file of deploy/postfix/ with only the marked strings replaced (each must be
    there, so a test notices when the shipped file changes under it)."""
    text = (DEPLOY_POSTFIX / name).read_text()
    for old, new in replacements.items():
        assert old in text, f"deploy/postfix/{name} no longer contains {old!r}: update the test"
        text = text.replace(old, new)
    return text


def main_cf_settings(text: str) -> dict[str, str]:
    """``name = value`` lines of a main.cf snippet (comments and blank lines skipped;
    continuation lines joined, as Postfix reads them)."""
    settings: dict[str, str] = {}
    last = ""
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace() and last:
            settings[last] += " " + line.strip()
            continue
        name, sep, value = line.partition("=")
        assert sep, f"not a main.cf setting: {line!r}"
        last = name.strip()
        settings[last] = value.strip()
    return settings


@dataclass(frozen=True)
class SmtpResult:
    """The reply that ended a client's attempt: the first refusal before RCPT, the last
    RCPT refusal when no recipient was accepted, else the DATA reply. ``refused`` holds
    the recipients refused while others were accepted (the message went to those)."""

    code: int
    text: str
    stage: str  # connect, ehlo, mail, rcpt, data
    refused: tuple[tuple[str, int, str], ...] = ()

    @property
    def queue_id(self) -> str:
        match = re.search(r"queued as ([0-9A-Za-z]+)", self.text)
        assert match, f"no queue id in {self}"
        return match.group(1)


async def send(
    port: int,
    rcpts: Sequence[str],
    data: bytes,
    *,
    sender: str = "alice@sender.test",
    helo: str = "client.sender.test",
    client_ip: str = "127.0.0.2",
    mail_options: Sequence[str] = (),
    timeout: float = 30,
) -> SmtpResult:
    """One message through an SMTP server, from ``client_ip`` (any 127/8 address works on
    Linux, so tests can be an Internet client or one from ``mynetworks``); never raises on
    a refusal, returns it."""
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1",
        port=port,
        local_hostname=helo,
        source_address=(client_ip, 0),
        timeout=timeout,
        start_tls=False,
    )
    stage = "connect"
    try:
        await client.connect()
        stage = "ehlo"
        await client.ehlo()
        stage = "mail"
        # aiosmtplib encodes addresses as ASCII unless told otherwise (RFC 6531 needs UTF-8).
        encoding = "utf-8" if "SMTPUTF8" in mail_options else "ascii"
        await client.mail(sender, options=list(mail_options), encoding=encoding)
        stage = "rcpt"
        refused: list[tuple[str, int, str]] = []
        for rcpt in rcpts:
            try:
                await client.rcpt(rcpt, encoding=encoding)
            except aiosmtplib.SMTPRecipientRefused as exc:
                refused.append((rcpt, exc.code, exc.message))
        if len(refused) == len(rcpts):
            _, code, text = refused[-1]
            return SmtpResult(code, text, stage, tuple(refused))
        stage = "data"
        reply = await client.data(data)
        return SmtpResult(reply.code, reply.message, stage, tuple(refused))
    except aiosmtplib.SMTPResponseException as exc:
        return SmtpResult(exc.code, exc.message, stage)
    finally:
        with contextlib.suppress(aiosmtplib.SMTPException, OSError):
            if client.is_connected:
                await client.quit()
        client.close()


async def until(predicate: Callable[[], bool], what: str, seconds: float = 20) -> None:
    """Polls ``predicate`` until true; fails with ``what`` after ``seconds`` (monotonic,
    so libfaketime's offset does not matter)."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in {seconds:.0f}s: {what}")
        await asyncio.sleep(0.1)


@dataclass
class Postfix:
    """A running private instance (see ``running_postfix``)."""

    root: Path
    name: str
    port: int  # the public smtpd
    postfix: str
    main: dict[str, str] = field(default_factory=dict)

    @property
    def config_dir(self) -> Path:
        return self.root / "conf"

    @property
    def log_path(self) -> Path:
        return self.root / "postfix.log"

    def log(self) -> str:
        """Postfix's whole log so far (maillog_file)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "postfix log:\n" + "\n".join(self.log().splitlines()[-lines:])

    async def wait_log(self, pattern: str, seconds: float = 20) -> re.Match[str]:
        """The first log line matching ``pattern`` (a regex), polled until it appears."""
        found: list[re.Match[str]] = []

        def seen() -> bool:
            match = re.search(pattern, self.log())
            if match:
                found.append(match)
            return match is not None

        try:
            await until(seen, f"postfix log line {pattern!r}", seconds)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log_tail()}") from None
        return found[0]

    def command(
        self, *args: str, input_text: str | None = None, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """A Postfix command (postqueue, postsuper, postconf ...) on this instance;
        ``sendmail`` takes ``-C`` for the configuration directory, the others ``-c``."""
        binary = _which(args[0])
        assert binary, f"{args[0]} not found"
        flag = "-C" if args[0] == "sendmail" else "-c"
        return subprocess.run(
            [binary, flag, str(self.config_dir), *args[1:]],
            input=input_text,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=real_clock_env(),
            check=False,
        )

    def queue(self) -> list[dict[str, Any]]:
        """``postqueue -j``: one dict per queued message (queue_name, queue_id, sender,
        recipients with delay_reason ...)."""
        done = self.command("postqueue", "-j")
        assert done.returncode == 0, done.stderr
        return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]

    def flush(self) -> None:
        """``postqueue -f``: retry all deferred mail now (also forgets dead destinations)."""
        done = self.command("postqueue", "-f")
        assert done.returncode == 0, done.stderr

    async def wait_queue_empty(self, seconds: float = 20) -> None:
        last: list[list[dict[str, Any]]] = []

        def empty() -> bool:
            last.append(self.queue())
            return not last[-1]

        try:
            await until(empty, "an empty Postfix queue", seconds)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {last[-1] if last else None}") from None


def _render_main(settings: Mapping[str, str]) -> str:
    return "".join(f"{k} = {v}\n" for k, v in settings.items())


def _smtpd_line(port: int, options: Mapping[str, str]) -> str:
    lines = [f"127.0.0.1:{port} inet  n       -       n       -       -       smtpd"]
    lines += [f"  -o {k}={v}" for k, v in options.items()]
    return "\n".join(lines) + "\n"


def _wait_greeting(port: int, proc: subprocess.Popen[bytes], instance: Postfix) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"postfix exited early ({proc.returncode})\n{instance.log_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
                if conn.recv(64).startswith(b"220"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"postfix smtpd on {port} never greeted\n{instance.log_tail()}")


@contextlib.contextmanager
def running_postfix(
    name: str,
    *,
    relayhost: str,
    main: Mapping[str, str] | None = None,
    master: str = "",
    smtpd_options: Mapping[str, str] | None = None,
    port: int | None = None,
    default_smtpd: bool = True,
) -> Iterator[Postfix]:
    """A private Postfix instance, started and (always) stopped; see the module docstring.

    ``relayhost`` is ``host:port`` (an IP literal: no DNS). ``main`` overrides/extends
    main.cf, ``master`` is appended to master.cf as is, ``smtpd_options`` are ``-o`` lines
    of the public smtpd on ``port`` (default: a free one). With ``default_smtpd=False``
    no public smtpd is added: ``master`` must define one on ``port``."""
    postfix = postfix_or_skip()
    root = Path(tempfile.mkdtemp(prefix=f"relay-postfix-{name}-"))
    root.chmod(0o755)  # the postfix user must reach its queue and data directories
    public = port or free_port()
    settings = {**base_main_cf(root, name, relayhost), **(main or {})}
    instance = Postfix(root, name, public, postfix, dict(settings))
    conf = instance.config_dir
    conf.mkdir()
    (root / "queue").mkdir(mode=0o755)  # root-owned, as Postfix requires; check fills it
    (conf / "main.cf").write_text(_render_main(settings))
    (conf / "master.cf").write_text(
        BASE_MASTER_CF
        + (_smtpd_line(public, smtpd_options or {}) if default_smtpd else "")
        + master
    )
    env = real_clock_env()
    proc: subprocess.Popen[bytes] | None = None
    master_pid = 0
    try:
        # `check` creates the queue subdirectories and data_directory with the owners and
        # modes of postfix-files (postfix / postdrop), and fails on a broken main.cf.
        done = subprocess.run(
            [postfix, "-c", str(conf), "check"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )
        assert done.returncode == 0, f"postfix check: {done.stderr}\n{instance.log_tail()}"
        with (root / "postfix.stderr").open("wb") as stderr:
            proc = subprocess.Popen(
                [postfix, "-c", str(conf), "start-fg"],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                env=env,
                start_new_session=True,  # its own process group: the teardown reaches all
            )
        _wait_greeting(public, proc, instance)
        master_pid = _master_pid(root)
        yield instance
    finally:
        if proc is not None:
            _stop(postfix, conf, proc, master_pid, env)
        shutil.rmtree(root, ignore_errors=True)


def _master_pid(root: Path) -> int:
    """The master's pid, from this instance's own pid file (queue_directory/pid)."""
    with contextlib.suppress(OSError, ValueError):
        return int((root / "queue" / "pid" / "master.pid").read_text().strip())
    return 0


def _stop(
    postfix: str,
    conf: Path,
    proc: subprocess.Popen[bytes],
    master_pid: int,
    env: dict[str, str],
) -> None:
    """``postfix -c DIR stop`` (this instance's master only: it reads the pid file in our
    queue directory), then the process groups, in case a daemon lingers."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        subprocess.run(
            [postfix, "-c", str(conf), "stop"],
            capture_output=True,
            timeout=30,
            env=env,
            check=False,
        )
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=20)
    # master calls setsid(): its daemons are in its own process group, not in proc's.
    for group in (master_pid, proc.pid):
        if group:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


class ThreadedSink:
    """The aiosmtpd sink of ``tests.support.relay`` on its own thread and event loop, so
    a module-scoped (synchronous) fixture can keep it across tests. SMTPUTF8 is offered,
    like a real mail store. ``messages`` is the Sink's list (appended on that thread)."""

    def __init__(self, **kwargs: Any) -> None:
        self.sink = Sink(**kwargs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        return self.sink.address

    @property
    def messages(self) -> list[Received]:
        return self.sink.messages

    def __enter__(self) -> ThreadedSink:
        self._thread.start()

        async def start() -> asyncio.Server:
            sink = self.sink

            def factory() -> SMTP:
                sink.connections += 1
                return SMTP(sink, decode_data=False, hostname="sink.test", enable_SMTPUTF8=True)

            return await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)

        self._server = asyncio.run_coroutine_threadsafe(start(), self._loop).result(10)
        self.sink.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def __exit__(self, *exc: object) -> None:
        server = self._server

        async def stop() -> None:
            if server is not None:
                server.close()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(server.wait_closed(), 1.0)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    async def wait_for(self, count: int, seconds: float = 20) -> list[Received]:
        """Waits until at least ``count`` messages arrived; returns them all."""
        await until(lambda: len(self.messages) >= count, f"{count} message(s) at the sink", seconds)
        return list(self.messages)

    async def wait_for_match(
        self, predicate: Callable[[Received], bool], what: str, seconds: float = 20
    ) -> Received:
        """The first message for which ``predicate`` holds, polled until it arrives."""
        try:
            await until(lambda: any(predicate(m) for m in list(self.messages)), what, seconds)
        except AssertionError as exc:
            seen = [(m.mail_from, m.rcpt_tos) for m in list(self.messages)]
            raise AssertionError(f"{exc}; the sink has {seen}") from None
        return next(m for m in list(self.messages) if predicate(m))

"""One child per relay worker classifies and verifies (``relay.analysis``, issue 17).

In process, real children: one pid answers both kinds; each kind keeps its deadline, its
bound and its failure kind; a child that dies or hangs under one kind costs the other
kind's requests a retry on the replacement, never an answer; a model hot swap moves
verification to the new children without losing a request in flight. Over a real
``relay serve`` with 2 workers: each worker has exactly one child, a DKIM-signed message
is stamped dkim=pass, and a stopped or killed child is replaced with mail still flowing.

Every wait is for a condition, never a fixed sleep; deadlines are generous.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib
import pytest

from relay.analysis import MODULE, Analysis
from relay.assembly import open_classifier
from relay.auth.checker import Authenticator
from relay.auth.cryptoproc import VERIFY, decode_answer, encode_request
from relay.auth.verify import verify_message
from relay.classifier.child import INFO, Served
from relay.classifier.serving import Classifier
from relay.config import DnsSettings
from relay.dns import Resolver
from relay.errors import ModelError, WorkerBusy, WorkerTimeout
from relay.message import Message
from relay.models.holder import ClassifierHolder
from tests.support.authenv import incoming
from tests.support.dkimkeys import SigningKey, make_message, rsa_key, sign
from tests.support.dnsserver import LocalDns
from tests.support.postfix import SmtpResult, send, until
from tests.support.relay import free_port, make_settings
from tests.support.served import MODEL, children, cmdline, serve_two_workers

REPO = Path(__file__).resolve().parents[1]
RCPT = ["bob@example.org"]

needs_model = pytest.mark.skipif(not MODEL.exists(), reason=f"{MODEL} is not built")


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return rsa_key("example.com", "shared", 2048)


@pytest.fixture(scope="module")
def dns(key: SigningKey) -> Iterator[LocalDns]:
    with LocalDns({key.name: [("TXT", key.txt)]}) as server:
        yield server


def test_a_verification_request_gets_what_verify_message_gives(key: SigningKey) -> None:
    """The child's dispatch, without a model: ``V`` + the cryptoproc request is answered by
    verification (also in a batch beside classifier requests); other ops go to the model."""
    raw = sign(make_message(), key)
    keys: dict[bytes, bytes | None] = {key.name.encode(): key.txt.encode()}
    request = VERIFY + b"".join(encode_request(raw, keys, 10, False))
    analysis = Analysis(Served(None, "no model here"))
    expected = verify_message(raw, keys, 10, False)
    assert decode_answer(analysis.handle(request)) == expected
    assert [s.result for s in expected[0].signatures] == ["pass"]
    with pytest.raises(ModelError, match="no model here"):
        analysis.handle(b"C" + raw)
    with pytest.raises(ModelError):  # serve then answers each request alone
        analysis.handle_many([request, b"C" + raw])
    (alone,) = analysis.handle_many([request])  # no classifier request: no model needed
    assert decode_answer(alone) == expected
    assert b"error" in analysis.handle(INFO)


@dataclass
class Shared:
    classifier: Classifier
    auth: Authenticator
    signed: Message

    async def verify(self) -> str:
        results = await self.auth.check(self.signed)
        return results.dkim.signatures[0].result


@contextlib.asynccontextmanager
async def shared(
    dns: LocalDns,
    key: SigningKey,
    *,
    model_timeout: float = 60.0,
    auth_timeout: float = 60.0,
    model_pending: int = 256,
    auth_pending: int = 256,
) -> AsyncIterator[Shared]:
    """A classifier on ``relay.analysis`` children and an authenticator verifying in them,
    wired as ``assembly.open_classifier`` wires a relay worker's."""
    if not MODEL.exists():
        pytest.skip(f"{MODEL} is not built")
    resolver = Resolver(DnsSettings(nameservers=(("127.0.0.1", dns.port),), timeout=2.0))
    auth = Authenticator(
        resolver, shared=True, verify_timeout=auth_timeout, max_pending=auth_pending
    )
    classifier = await Classifier.open(
        MODEL, kill_after=model_timeout, max_pending=model_pending, module=MODULE
    )
    auth.share(classifier.children)
    try:
        yield Shared(classifier, auth, incoming(sign(make_message(), key)))
    finally:
        await classifier.close()
        await auth.close()
        await resolver.close()


def note(n: int) -> Message:
    return Message.from_file_bytes(
        f"From: a@sender.test\r\nSubject: note\r\n\r\nSee you at meeting {n}.\r\n".encode(),
        received_at=1_795_000_000.0,
        mail_from="a@sender.test",
        rcpt_to=("bob@example.org",),
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_one_child_classifies_and_verifies(dns: LocalDns, key: SigningKey) -> None:
    async with shared(dns, key) as s:
        assert await s.verify() == "pass"
        assert 0.0 <= (await s.classifier.classify(note(1))).probability <= 1.0
        assert len(s.classifier.pids) == 1 and s.auth.pids == s.classifier.pids


async def test_a_hang_in_classification_kills_the_child_and_verification_retries(
    dns: LocalDns, key: SigningKey
) -> None:
    """The stopped child holds a classification (deadline 2 s) and a verification
    (deadline 60 s): the classification fails as a timeout (its own kind, not "model"), the
    child is killed, and the verification it held is sent once more to the replacement."""
    async with shared(dns, key, model_timeout=2.0) as s:
        assert await s.verify() == "pass"  # keys cached: the next check goes straight in
        (pid,) = s.classifier.pids
        os.kill(pid, signal.SIGSTOP)
        verifying = asyncio.ensure_future(s.verify())
        await until(lambda: s.auth.pending == 1, "the verification in the stopped child")
        with pytest.raises(WorkerTimeout):
            await asyncio.wait_for(s.classifier.classify(note(1)), 60)
        assert await asyncio.wait_for(verifying, 60) == "pass"
        await until(lambda: not _alive(pid), "the stopped child killed", 30)
        assert s.classifier.replaced == 1 and pid not in s.auth.pids


async def test_a_hang_in_verification_kills_the_child_and_classification_retries(
    dns: LocalDns, key: SigningKey
) -> None:
    async with shared(dns, key, auth_timeout=2.0) as s:
        assert await s.verify() == "pass"
        expected = await s.classifier.classify(note(1))
        (pid,) = s.classifier.pids
        os.kill(pid, signal.SIGSTOP)
        classifying = asyncio.ensure_future(s.classifier.classify(note(1)))
        await until(lambda: s.classifier.pending == 1, "the classification in the stopped child")
        with pytest.raises(WorkerTimeout):
            await asyncio.wait_for(s.auth.check(s.signed), 60)
        assert await asyncio.wait_for(classifying, 60) == expected
        await until(lambda: not _alive(pid), "the stopped child killed", 30)
        assert pid not in s.classifier.pids


async def test_a_killed_child_costs_both_kinds_a_retry_only(dns: LocalDns, key: SigningKey) -> None:
    async with shared(dns, key) as s:
        assert await s.verify() == "pass"
        expected = await s.classifier.classify(note(1))
        (pid,) = s.classifier.pids
        os.kill(pid, signal.SIGSTOP)
        calls = [
            asyncio.ensure_future(s.verify()),
            asyncio.ensure_future(s.classifier.classify(note(1))),
        ]
        await until(lambda: s.auth.pending == 1 and s.classifier.pending == 1, "both in the child")
        os.kill(pid, signal.SIGKILL)
        assert await asyncio.wait_for(asyncio.gather(*calls), 60) == ["pass", expected]
        assert s.classifier.replaced == 1 and pid not in s.auth.pids


async def test_each_kind_keeps_its_own_pending_bound(dns: LocalDns, key: SigningKey) -> None:
    """One classification and one verification held by a stopped child: with both bounds
    at 1, a second of either kind fails at once (the classifier's as a model failure), yet
    neither kind's held request blocks the other kind."""
    async with shared(dns, key, model_pending=1, auth_pending=1) as s:
        assert await s.verify() == "pass"
        (pid,) = s.classifier.pids
        os.kill(pid, signal.SIGSTOP)
        try:
            classifying = asyncio.ensure_future(s.classifier.classify(note(1)))
            verifying = asyncio.ensure_future(s.verify())
            await until(lambda: s.auth.pending == 1 and s.classifier.pending == 1, "both held")
            with pytest.raises(ModelError) as refused:
                await asyncio.wait_for(s.classifier.classify(note(2)), 60)
            assert isinstance(refused.value.__cause__, WorkerBusy)
            with pytest.raises(WorkerBusy):
                await asyncio.wait_for(s.auth.check(s.signed), 60)
            assert not classifying.done() and not verifying.done()
        finally:
            os.kill(pid, signal.SIGCONT)
        assert 0.0 <= (await asyncio.wait_for(classifying, 60)).probability <= 1.0
        assert await asyncio.wait_for(verifying, 60) == "pass"
        assert s.classifier.replaced == 0


async def test_a_model_hot_swap_moves_verification_without_losing_a_request(
    tmp_path: Path, dns: LocalDns, key: SigningKey
) -> None:
    """As ``Runtime.reload_model`` does: ``open_classifier`` opens the new children and
    hands them to the authenticator; the holder closes the old classifier (no message pins
    it). A verification held by the old child (stopped) then dies with it, and is sent to
    the new children, not failed."""
    if not MODEL.exists():
        pytest.skip(f"{MODEL} is not built")
    settings = make_settings(
        tmp_path, {"model": {"enabled": True, "path": str(MODEL)}, "auth": {"enabled": True}}
    )
    resolver = Resolver(DnsSettings(nameservers=(("127.0.0.1", dns.port),), timeout=2.0))
    auth = Authenticator.from_settings(resolver, settings.auth, shared=True)
    signed = incoming(sign(make_message(), key))
    holder = ClassifierHolder(await open_classifier(settings, MODEL, auth), MODEL)
    try:
        old = holder.current
        assert auth.pids == old.pids and len(old.pids) == 1
        assert (await auth.check(signed)).dkim.signatures[0].result == "pass"
        with pytest.raises(ModelError):  # a reload that fails leaves verification in place
            await open_classifier(settings, tmp_path / "absent.skops", auth)
        assert auth.pids == old.pids
        (pid,) = old.pids
        os.kill(pid, signal.SIGSTOP)
        verifying = asyncio.ensure_future(auth.check(signed))
        await until(lambda: auth.pending == 1, "a verification in the old child")
        holder.swap(await open_classifier(settings, MODEL, auth), REPO / "new")
        new = holder.current
        assert auth.pids == new.pids and pid not in new.pids
        results = await asyncio.wait_for(verifying, 60)
        assert results.dkim.signatures[0].result == "pass"
        await until(lambda: old.closed and not _alive(pid), "the old child gone", 30)
        assert (await auth.check(signed)).dkim.signatures[0].result == "pass"
        assert 0.0 <= (await new.classify(note(1))).probability <= 1.0
    finally:
        await holder.close()
        await auth.close()
        await resolver.close()


# A real `relay serve` with 2 workers ------------------------------------------------------


def _workers(supervisor: int) -> list[int]:
    return [
        p
        for p in children(supervisor)
        if "relay.launch" in cmdline(p) or "spawn_main" in cmdline(p)
    ]


def _analysischildren(worker: int) -> list[int]:
    return [p for p in children(worker) if "relay.analysis" in cmdline(p)]


@contextlib.asynccontextmanager
async def _serving(tmp_path: Path, dns: LocalDns) -> AsyncIterator[tuple[int, int]]:
    """(port, supervisor pid) of `relay serve` with the default policy and checks, 2
    workers, and a verification deadline of 3 s (the default is 30)."""
    port = free_port()
    async with serve_two_workers(tmp_path, port, dns.address, auth="timeout = 3\n") as proc:
        yield port, proc.pid


async def _first_delivery(port: int, data: bytes, log: Path) -> SmtpResult:
    """Sends until the relay listens and both workers are up (start-up loads the model)."""
    for _ in range(600):
        try:
            result = await send(port, RCPT, data, timeout=120)
        except (aiosmtplib.SMTPConnectError, OSError):
            await asyncio.sleep(0.1)
            continue
        if result.code != 421:
            return result
        await asyncio.sleep(0.1)
    raise AssertionError(log.read_text())


def _delivered(tmp_path: Path) -> dict[str, bytes]:
    new = tmp_path / "maildir" / "new"
    return {p.name: p.read_bytes() for p in new.iterdir()} if new.exists() else {}


def _auth_results(raw: bytes) -> str:
    """The Authentication-Results fields, unfolded ("" when there is none)."""
    head = raw.split(b"\r\n\r\n", 1)[0].replace(b"\r\n\t", b" ").replace(b"\r\n ", b" ")
    fields = [h for h in head.split(b"\r\n") if h.lower().startswith(b"authentication-results:")]
    return "\n".join(f.decode() for f in fields)


@needs_model
async def test_relay_serve_runs_one_child_per_worker_for_both_kinds(
    tmp_path: Path, dns: LocalDns, key: SigningKey
) -> None:
    signed = sign(make_message(), key)
    async with _serving(tmp_path, dns) as (port, supervisor):
        first = await _first_delivery(port, signed, tmp_path / "relay.log")
        assert first.code == 250, first
        log = tmp_path / "relay.log"
        # both workers ready (the supervisor logs it): a child killed while its worker
        # still starts fails the start-up, by design
        await until(
            lambda: len(re.findall(r"worker \d+ ready", log.read_text())) == 2, "ready", 120
        )
        workers = _workers(supervisor)
        for worker in workers:  # one child each, the analysis child: nothing else
            assert len(children(worker)) == 1, [cmdline(p) for p in children(worker)]
            assert len(_analysischildren(worker)) == 1, [cmdline(p) for p in children(worker)]
        (delivered,) = _delivered(tmp_path).values()
        assert "dkim=pass" in _auth_results(delivered)

        # SIGKILL: each worker's child dies and is replaced; the next messages are
        # verified and classified as before (250: the policy requires the classifier).
        old = {w: _analysischildren(w)[0] for w in workers}
        for child in old.values():
            os.kill(child, signal.SIGKILL)
        await until(lambda: not any(_alive(c) for c in old.values()), "children killed", 30)
        # Each worker starts its replacement at once, not when a message needs it: both
        # say they are ready before any message is sent (a child that exists may still be
        # loading the model, and one stopped then would never be ready).
        await until(
            lambda: log.read_text().count("ready (a replacement)") >= 2, "replacements", 120
        )
        for _ in range(4):
            assert (await send(port, RCPT, signed, timeout=120)).code == 250
        for raw in _delivered(tmp_path).values():
            assert "dkim=pass" in _auth_results(raw)
        for worker in workers:
            replaced = _analysischildren(worker)
            assert len(replaced) == 1 and replaced[0] not in old.values()

        # SIGSTOP: a message's verification overruns [auth] timeout (3 s); its child is
        # killed, its auth facts fail (the default policy does not require them) and it is
        # classified by the replacement: delivered, not lost and not held.
        assert all(len(_analysischildren(w)) == 1 for w in workers)
        stopped = [_analysischildren(w)[0] for w in workers]
        for child in stopped:
            os.kill(child, signal.SIGSTOP)
        before = set(_delivered(tmp_path))
        try:
            hung = await send(port, RCPT, signed, timeout=120)
            assert hung.code == 250, hung
            await until(lambda: not all(_alive(c) for c in stopped), "a stopped child killed", 30)
        finally:
            for child in stopped:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGCONT)
        (fresh,) = [raw for name, raw in _delivered(tmp_path).items() if name not in before]
        assert "dkim=pass" not in _auth_results(fresh)  # verification failed, not faked
        after = await send(port, RCPT, signed, timeout=120)
        assert after.code == 250, after

"""SPF (RFC 7208) with pyspf, fed by our async resolver, evaluated on the event loop.

pyspf evaluates the record (mechanisms, macros, the 10-lookup and 2-void-lookup limits,
temperror vs permerror) but does its own blocking DNS through a module-level function.
We subclass its ``query`` and replace the one method that talks to DNS, ``dns``, so that
it only reads answers the shared ``Resolver`` already has in its cache. When pyspf asks for
a name that is not cached, the evaluation stops (``_NeedAnswer``), the answer is fetched
asynchronously, and the evaluation starts again. A warm cache means one pass of pure
Python (well under a millisecond), so nothing waits in a thread and the loop never
blocks. Our resolver follows CNAMEs itself, so pyspf's CNAME
bookkeeping is not needed.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import spf

from relay.auth.domains import normalise_domain
from relay.auth.results import SpfResult
from relay.dns import DnsTemporaryError, Resolver

SPF_DEADLINE = 20.0  # RFC 7208 4.6.4 suggests at least 20 s for the whole evaluation
MAX_ANSWERS = 120  # 10 DNS terms x 10 MX/PTR names, plus the records themselves

Answer = list[Any] | DnsTemporaryError
SPF_CACHE_SIZE = 4096  # (identity, ip, sender, helo) results kept per process


class SpfCache:
    """Recent results, each with every DNS answer its evaluation read. An SPF result is a
    function of the client IP, the sender, the HELO name and those answers alone, so when
    each answer is still the same in the resolver's cache (it expires with its TTL), the
    stored result is exactly what a new evaluation would give, without running pyspf
    (about 0.15 ms a message in the relay). Results that met a DNS error are not kept."""

    def __init__(self, size: int = SPF_CACHE_SIZE) -> None:
        self._size = size
        self._entries: dict[_Question, tuple[SpfResult, tuple[tuple[Any, Any], ...]]] = {}

    def get(self, resolver: Resolver, key: _Question) -> SpfResult | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        result, read = entry
        for (name, qtype), answer in read:
            if _peek(resolver, name, qtype) != answer:
                del self._entries[key]  # a record changed or expired: evaluate again
                return None
        return result

    def put(self, key: _Question, result: SpfResult, read: dict[tuple[str, str], Answer]) -> None:
        if self._size <= 0 or any(isinstance(a, DnsTemporaryError) for a in read.values()):
            return
        if len(self._entries) >= self._size:
            del self._entries[next(iter(self._entries))]  # oldest first: bounded memory
        self._entries[key] = (result, tuple(read.items()))


class _NeedAnswer(BaseException):
    """Raised through pyspf (which catches only its own errors) to fetch one answer.
    A BaseException so no ``except Exception`` on the way can mistake it for a failure."""

    def __init__(self, name: str, qtype: str) -> None:
        super().__init__(name, qtype)
        self.key = (name, qtype)


class _Query(spf.query):  # type: ignore[misc]
    """pyspf's query answering DNS questions from ``answers`` only (see module docstring)."""

    def __init__(
        self,
        resolver: Resolver,
        answers: dict[tuple[str, str], Answer],
        *args: Any,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._resolver = resolver
        self._answers = answers

    def dns(
        self, name: str, qtype: str, cnames: Any = None, ignore_void: bool = False
    ) -> list[Any]:
        # Same contract as spf.query.dns: a list of values, void lookups counted.
        name = str(name).rstrip(".").lower()
        if not name or any(not 0 < len(label) < 64 for label in name.split(".")):
            return []
        key = (name, qtype)
        if key not in self._answers:
            cached = _peek(self._resolver, name, qtype)
            if cached is None:
                raise _NeedAnswer(name, qtype)
            self._answers[key] = cached
        answer = self._answers[key]
        if isinstance(answer, DnsTemporaryError):
            raise spf.TempError(f"DNS {answer}")
        if not answer and not ignore_void:
            self.void_lookups += 1
            if self.void_lookups > spf.MAX_VOID_LOOKUPS:
                raise spf.PermError(f"Void lookup limit of {spf.MAX_VOID_LOOKUPS} exceeded")
        return list(answer)


def _peek(resolver: Resolver, name: str, qtype: str) -> list[Any] | None:
    """A cached answer in pyspf's shapes, without waiting; None when not cached."""
    if qtype == "TXT":
        txt = resolver.peek_txt(name)
        return None if txt is None else [[t] for t in txt]
    if qtype == "MX":
        mx = resolver.peek_mx(name)
        return None if mx is None else list(mx)
    if qtype == "PTR":
        ptr = resolver.peek_query(name, "PTR")
        return None if ptr is None else [n.rstrip(".") for n in ptr]
    if qtype in ("A", "AAAA"):
        return resolver.peek_query(name, qtype)
    return []


async def _fetch(resolver: Resolver, name: str, qtype: str) -> Answer:
    """One answer in the shapes pyspf's dnspython backend produces."""
    try:
        if qtype == "TXT":
            return [[txt] for txt in await resolver.txt(name)]
        if qtype == "MX":
            return list(await resolver.mx(name))
        if qtype == "PTR":
            return [n.rstrip(".") for n in await resolver.query(name, "PTR")]
        if qtype in ("A", "AAAA"):
            return list(await resolver.query(name, qtype))
    except DnsTemporaryError as exc:
        return exc
    return []  # type SPF (99) is obsolete (RFC 7208 3.1): never asked in strict mode


@dataclass(frozen=True, slots=True)
class _Question:
    """One SPF question: with the DNS answers it reads, all an SPF result depends on."""

    identity: str  # "mailfrom" | "helo"
    ip: str
    sender: str
    helo: str


def _attempt(
    resolver: Resolver,
    answers: dict[tuple[str, str], Answer],
    question: _Question,
    cache: SpfCache | None = None,
) -> SpfResult | tuple[str, str]:
    """One evaluation pass over what is known: the result, or the (name, type) to fetch."""
    if cache is not None and not answers:
        known = cache.get(resolver, question)
        if known is not None:
            return known
    outcome = _evaluate_once(resolver, answers, question)
    if cache is not None and isinstance(outcome, SpfResult):
        cache.put(question, outcome, answers)
    return outcome


def _evaluate_once(
    resolver: Resolver, answers: dict[tuple[str, str], Answer], question: _Question
) -> SpfResult | tuple[str, str]:
    identity, sender = question.identity, question.sender
    domain = _domain_of(sender)
    if len(answers) > MAX_ANSWERS:
        return SpfResult(identity, "permerror", domain, sender, "too many DNS names to evaluate")
    try:
        q = _Query(resolver, answers, i=question.ip, s=sender, h=question.helo, strict=True)
        result, _code, explanation = q.check()
    except _NeedAnswer as need:
        return need.key
    except (ValueError, spf.PermError) as exc:  # e.g. an unusable client address
        return SpfResult(identity, "permerror", domain, sender, str(exc)[:120])
    reason = "" if result in ("pass", "none") else str(explanation)[:120]
    return SpfResult(identity, str(result), domain, sender, reason)


async def _finish(
    resolver: Resolver,
    answers: dict[tuple[str, str], Answer],
    first: SpfResult | tuple[str, str],
    question: _Question,
    cache: SpfCache | None,
) -> SpfResult:
    """Fetch what the last pass asked for and evaluate again, until there is a result."""
    outcome = first
    while not isinstance(outcome, SpfResult):
        answers[outcome] = await _fetch(resolver, *outcome)
        outcome = _attempt(resolver, answers, question, cache)
    return outcome


def _domain_of(sender: str) -> str:
    try:
        return normalise_domain(sender.rpartition("@")[2])
    except ValueError:
        return sender.rpartition("@")[2].lower()


def _questions(ip: str, mail_from: str, helo: str) -> tuple[_Question, _Question]:
    """The MAIL FROM and HELO questions. The null sender is checked as postmaster@HELO
    (RFC 7208 2.4); without a usable HELO name the HELO identity has no domain."""
    helo = helo.strip().rstrip(".")
    helo_ok = "." in helo and not helo.startswith("[")
    helo_sender = f"postmaster@{helo}" if helo_ok else ""
    mail_sender = mail_from if mail_from else helo_sender
    return _Question("mailfrom", ip, mail_sender, helo), _Question("helo", ip, helo_sender, helo)


def _first_pass(
    resolver: Resolver,
    jobs: tuple[_Question, _Question],
    answers: list[dict[tuple[str, str], Answer]],
    cache: SpfCache | None,
) -> list[SpfResult | tuple[str, str]]:
    """Each question evaluated over the cache alone: a result, or the answer it needs."""
    first: list[SpfResult | tuple[str, str]] = []
    for job, known in zip(jobs, answers, strict=True):
        sender = job.sender
        if not sender or "@" not in sender or not sender.rpartition("@")[2]:
            first.append(SpfResult(job.identity, "none", "", sender, "no domain to check"))
        else:
            first.append(_attempt(resolver, known, job, cache))
    return first


def _no_address() -> tuple[SpfResult, SpfResult]:
    none = SpfResult("mailfrom", "none", reason="no client address")
    return none, SpfResult("helo", "none", reason="no client address")


def check_spf_cached(
    resolver: Resolver, ip: str, mail_from: str, helo: str, cache: SpfCache | None = None
) -> tuple[SpfResult, SpfResult] | None:
    """``check_spf`` from the resolver's cache alone, without waiting; None when an answer
    it needs is not cached (then await ``check_spf``)."""
    if not ip:
        return _no_address()
    jobs = _questions(ip, mail_from, helo)
    first = _first_pass(resolver, jobs, [{}, {}], cache)
    mailfrom, helo_result = first
    if isinstance(mailfrom, SpfResult) and isinstance(helo_result, SpfResult):
        return mailfrom, helo_result
    return None


async def check_spf(
    resolver: Resolver, ip: str, mail_from: str, helo: str, cache: SpfCache | None = None
) -> tuple[SpfResult, SpfResult]:
    """(MAIL FROM result, HELO result); see ``_questions`` for the identities. With a
    ``cache``, a repeated question whose DNS answers are unchanged skips pyspf."""
    if not ip:
        return _no_address()
    jobs = _questions(ip, mail_from, helo)
    answers: list[dict[tuple[str, str], Answer]] = [{}, {}]
    # First a pass over the cache alone: with a warm cache both results are known here and
    # nothing is awaited, which saves the tasks and loop turns of the general path.
    first = _first_pass(resolver, jobs, answers, cache)
    done = [outcome for outcome in first if isinstance(outcome, SpfResult)]
    if len(done) == len(jobs):
        return done[0], done[1]

    async def run(index: int) -> SpfResult:
        job = jobs[index]
        try:
            async with asyncio.timeout(SPF_DEADLINE):
                return await _finish(resolver, answers[index], first[index], job, cache)
        except TimeoutError:
            domain = _domain_of(job.sender)
            return SpfResult(job.identity, "temperror", domain, job.sender, "SPF took too long")

    mailfrom, helo_result = await asyncio.gather(run(0), run(1))
    return mailfrom, helo_result

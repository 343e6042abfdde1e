"""SPF (RFC 7208) with pyspf, fed by our async resolver.

pyspf evaluates the record (mechanisms, macros, the 10-lookup and 2-void-lookup limits,
temperror vs permerror) but does its own blocking DNS through a module-level function.
We subclass its ``query`` and replace the one method that talks to DNS, ``dns``: it asks
our shared, cached ``Resolver`` on the event loop and waits in the worker thread the check
runs in, so the loop never blocks and the cache is the one every other check uses.
Our resolver follows CNAMEs itself, so pyspf's own CNAME bookkeeping is not needed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from concurrent.futures import Executor
from typing import Any, TypeVar

import spf

from relay.auth.domains import normalise_domain
from relay.auth.results import SpfResult
from relay.dns import DnsTemporaryError, Resolver

T = TypeVar("T")
SPF_DEADLINE = 20.0  # RFC 7208 4.6.4 suggests at least 20 s for the whole evaluation


class _Query(spf.query):  # type: ignore[misc]
    """pyspf's query with DNS answered by our resolver (see module docstring)."""

    def __init__(
        self,
        resolver: Resolver,
        loop: asyncio.AbstractEventLoop,
        deadline: float,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._resolver = resolver
        self._loop = loop
        self._deadline = deadline

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        left = self._deadline - time.monotonic()
        if left <= 0:
            coro.close()
            raise spf.TempError("DNS: SPF evaluation took too long")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout=left)
        except DnsTemporaryError as exc:
            raise spf.TempError(f"DNS {exc}") from None
        except TimeoutError:
            future.cancel()
            raise spf.TempError("DNS: SPF evaluation took too long") from None

    def _lookup(self, name: str, qtype: str) -> list[Any]:
        if qtype == "TXT":
            return [[txt] for txt in self._run(self._resolver.txt(name))]
        if qtype == "MX":
            return list(self._run(self._resolver.mx(name)))
        if qtype == "PTR":
            return [n.rstrip(".") for n in self._run(self._resolver.query(name, "PTR"))]
        if qtype in ("A", "AAAA"):
            return list(self._run(self._resolver.query(name, qtype)))
        return []  # type SPF (99) is obsolete (RFC 7208 3.1): never asked in strict mode

    def dns(
        self, name: str, qtype: str, cnames: Any = None, ignore_void: bool = False
    ) -> list[Any]:
        # Same contract as spf.query.dns: a list of values, void lookups counted.
        name = str(name).rstrip(".").lower()
        if not name or any(not 0 < len(label) < 64 for label in name.split(".")):
            return []
        key = (name, qtype)
        if key not in self.cache:
            self.cache[key] = self._lookup(name, qtype)
        result: list[Any] = self.cache[key]
        if not result and not ignore_void:
            self.void_lookups += 1
            if self.void_lookups > spf.MAX_VOID_LOOKUPS:
                raise spf.PermError(f"Void lookup limit of {spf.MAX_VOID_LOOKUPS} exceeded")
        return result


def _check(
    resolver: Resolver,
    loop: asyncio.AbstractEventLoop,
    identity: str,
    ip: str,
    sender: str,
    helo: str,
) -> SpfResult:
    deadline = time.monotonic() + SPF_DEADLINE
    try:
        q = _Query(resolver, loop, deadline, i=ip, s=sender, h=helo, strict=True)
        result, _code, explanation = q.check()
    except (ValueError, spf.PermError) as exc:
        return SpfResult(identity, "permerror", _domain_of(sender), sender, str(exc)[:120])
    reason = "" if result in ("pass", "none") else str(explanation)[:120]
    return SpfResult(identity, str(result), _domain_of(sender), sender, reason)


def _domain_of(sender: str) -> str:
    try:
        return normalise_domain(sender.rpartition("@")[2])
    except ValueError:
        return sender.rpartition("@")[2].lower()


async def check_spf(
    resolver: Resolver, executor: Executor, ip: str, mail_from: str, helo: str
) -> tuple[SpfResult, SpfResult]:
    """(MAIL FROM result, HELO result). The null sender is checked as postmaster@HELO
    (RFC 7208 2.4); without a usable HELO name the HELO identity is ``none``."""
    loop = asyncio.get_running_loop()
    helo = helo.strip().rstrip(".")
    helo_ok = "." in helo and not helo.startswith("[")
    if not ip:
        none = SpfResult("mailfrom", "none", reason="no client address")
        return none, SpfResult("helo", "none", reason="no client address")
    helo_sender = f"postmaster@{helo}" if helo_ok else ""

    async def run(identity: str, sender: str) -> SpfResult:
        if not sender or "@" not in sender or not sender.rpartition("@")[2]:
            return SpfResult(identity, "none", "", sender, "no domain to check")
        return await loop.run_in_executor(
            executor, _check, resolver, loop, identity, ip, sender, helo
        )

    mail_sender = mail_from if mail_from else helo_sender
    mailfrom, helo_result = await asyncio.gather(
        run("mailfrom", mail_sender), run("helo", helo_sender)
    )
    return mailfrom, helo_result

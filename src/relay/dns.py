"""One asynchronous DNS resolver shared by every check (DKIM, SPF, DMARC, ARC, PTR ...).

Built on dnspython's asyncio resolver with its TTL-respecting LRU cache, which also keeps
negative answers (NXDOMAIN, no data), so one sender's records are fetched once however
many checks and messages ask for them. Concurrent identical questions share one query.
In front of that cache sits a plain dict of recent answers by (name, type) text with the
same expiry times: a hit there costs a dict lookup instead of building a dnspython Name
and locking its LRU cache (30 us -> about 1 us; a message asks five to ten questions).

Outcomes, as every caller sees them:
- an answer                    -> the records (text forms, see each method)
- NXDOMAIN, no data, bad name  -> []
- timeout, SERVFAIL, refusal   -> raises DnsTemporaryError (a FactError): the checks
  turn it into ``temperror``, never into a pass and never into a crash.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.reversename

from relay.config import DnsSettings
from relay.errors import FactError

_SUPPORTED = frozenset({"A", "AAAA", "TXT", "MX", "PTR", "CNAME", "NS", "SOA"})


class DnsTemporaryError(FactError):
    """The answer could not be had now (timeout, SERVFAIL, no server): try again later."""


class Resolver:
    """Async resolver with a shared cache; one per relay process, owned by app.py."""

    def __init__(self, settings: DnsSettings) -> None:
        self.settings = settings
        if settings.nameservers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [
                dns.nameserver.Do53Nameserver(host, port) for host, port in settings.nameservers
            ]
        else:
            try:
                resolver = dns.asyncresolver.Resolver(configure=True)
            except dns.resolver.NoResolverConfiguration:
                # No resolv.conf (minimal containers): the local stub is the usual answer.
                resolver = dns.asyncresolver.Resolver(configure=False)
                resolver.nameservers = ["127.0.0.1"]
        resolver.timeout = settings.timeout
        resolver.lifetime = settings.timeout
        resolver.retry_servfail = False
        resolver.edns = 0  # 1232-byte UDP payload: 2048/4096-bit DKIM keys fit
        if settings.cache_size > 0:
            resolver.cache = dns.resolver.LRUCache(settings.cache_size)
        self._resolver = resolver
        self._inflight: dict[tuple[str, str], asyncio.Future[list[object]]] = {}
        # (name, TYPE) -> (expiry on time.time(), rdatas): see the module docstring.
        self._recent: dict[tuple[str, str], tuple[float, tuple[object, ...]]] = {}
        self._recent_size = settings.cache_size

    async def query(self, name: str, rdtype: str) -> list[str]:
        """Text of each rdata (``to_text()`` form), e.g. ``"10 mx.example.com."`` for MX."""
        return [r.to_text() for r in await self._rdatas(name, rdtype)]  # type: ignore[attr-defined]

    async def txt(self, name: str) -> list[bytes]:
        """Each TXT record with its character-strings joined (RFC 7208 3.3, RFC 6376 3.6.2.2)."""
        return [b"".join(r.strings) for r in await self._rdatas(name, "TXT")]  # type: ignore[attr-defined]

    async def ptr(self, ip: str) -> list[str]:
        """PTR names of an address, without the trailing dot; [] for a bad address."""
        try:
            rev = dns.reversename.from_address(ip).to_text()
        except (ValueError, dns.exception.SyntaxError):
            return []
        return [
            r.target.to_text(omit_final_dot=True)  # type: ignore[attr-defined]
            for r in await self._rdatas(rev, "PTR")
        ]

    async def mx(self, name: str) -> list[tuple[int, str]]:
        """(preference, exchange without trailing dot) pairs."""
        return [
            (int(r.preference), r.exchange.to_text(omit_final_dot=True))  # type: ignore[attr-defined]
            for r in await self._rdatas(name, "MX")
        ]

    async def addresses(self, name: str) -> list[str]:
        """A then AAAA addresses; a temporary failure of either raises."""
        v4, v6 = await asyncio.gather(self.query(name, "A"), self.query(name, "AAAA"))
        return [str(ipaddress.ip_address(a)) for a in (*v4, *v6)]

    def peek_txt(self, name: str) -> list[bytes] | None:
        """Like ``txt`` but from the cache only, without waiting: None when not cached."""
        rdatas = self._peek(name, "TXT")
        return None if rdatas is None else [b"".join(r.strings) for r in rdatas]  # type: ignore[attr-defined]

    def peek_query(self, name: str, rdtype: str) -> list[str] | None:
        """Like ``query`` but from the cache only: None when not cached."""
        rdatas = self._peek(name, rdtype)
        return None if rdatas is None else [r.to_text() for r in rdatas]  # type: ignore[attr-defined]

    def peek_mx(self, name: str) -> list[tuple[int, str]] | None:
        """Like ``mx`` but from the cache only: None when not cached."""
        rdatas = self._peek(name, "MX")
        if rdatas is None:
            return None
        return [
            (int(r.preference), r.exchange.to_text(omit_final_dot=True))  # type: ignore[attr-defined]
            for r in rdatas
        ]

    def _recall(self, key: tuple[str, str]) -> list[object] | None:
        entry = self._recent.get(key)
        if entry is None:
            return None
        if entry[0] <= time.time():
            del self._recent[key]
            return None
        return list(entry[1])

    def _remember(self, key: tuple[str, str], rdatas: list[object], expires: float) -> None:
        if self._recent_size <= 0:
            return
        if len(self._recent) >= self._recent_size:
            del self._recent[next(iter(self._recent))]  # oldest first: bounded memory
        self._recent[key] = (expires, tuple(rdatas))

    def _peek(self, name: str, rdtype: str) -> list[object] | None:
        recent = self._recall((name.lower().rstrip("."), rdtype.upper()))
        if recent is not None:
            return recent
        # Reads dnspython's cache the way its resolver does: the answer for (name, type),
        # else a cached NXDOMAIN for the name (stored under type ANY).
        cache = self._resolver.cache
        if cache is None:
            return None
        try:
            qname = dns.name.from_text(name.lower().rstrip("."))
        except (dns.exception.DNSException, UnicodeError, ValueError):
            return []
        want = dns.rdatatype.from_text(rdtype.upper())
        answer = cache.get((qname, want, dns.rdataclass.IN))
        if answer is not None:
            return [] if answer.rrset is None else [r for r in answer.rrset if r.rdtype == want]
        nx = cache.get((qname, dns.rdatatype.ANY, dns.rdataclass.IN))
        if nx is not None and nx.response.rcode() == dns.rcode.NXDOMAIN:
            return []
        return None

    async def close(self) -> None:
        self._resolver.cache = None
        self._recent.clear()
        for fut in self._inflight.values():
            fut.cancel()
        self._inflight.clear()

    async def _rdatas(self, name: str, rdtype: str) -> list[object]:
        rdtype = rdtype.upper()
        if rdtype not in _SUPPORTED:
            raise ValueError(f"unsupported record type {rdtype}")
        key = (name.lower().rstrip("."), rdtype)
        recent = self._recall(key)
        if recent is not None:
            return recent
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[list[object]] = asyncio.ensure_future(self._lookup(key))
        self._inflight[key] = fut
        fut.add_done_callback(lambda _f: self._inflight.pop(key, None))
        return await asyncio.shield(fut)

    async def _lookup(self, key: tuple[str, str]) -> list[object]:
        name, rdtype = key
        try:
            qname = dns.name.from_text(name)  # IDNA-encodes non-ASCII labels
        except (dns.exception.DNSException, UnicodeError, ValueError):
            return []  # a name that cannot exist in the DNS has no records
        try:
            answer = await self._resolver.resolve(
                qname, rdtype, search=False, raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN:
            self._remember_nxdomain(key, qname)
            return []
        except dns.resolver.NoAnswer:
            return []
        except dns.resolver.YXDOMAIN:
            return []
        except dns.exception.Timeout as exc:
            raise DnsTemporaryError(f"DNS timeout for {name}/{rdtype}") from exc
        except dns.resolver.NoNameservers as exc:
            raise DnsTemporaryError(f"DNS server failure for {name}/{rdtype}") from exc
        except dns.exception.DNSException as exc:
            raise DnsTemporaryError(f"DNS error for {name}/{rdtype}: {type(exc).__name__}") from exc
        except OSError as exc:
            raise DnsTemporaryError(f"DNS unreachable for {name}/{rdtype}: {exc}") from exc
        want = dns.rdatatype.from_text(rdtype)
        rdatas: list[object] = (
            [] if answer.rrset is None else [r for r in answer.rrset if r.rdtype == want]
        )
        if self._resolver.cache is not None:
            self._remember(key, rdatas, answer.expiration)
        return rdatas

    def _remember_nxdomain(self, key: tuple[str, str], qname: dns.name.Name) -> None:
        # dnspython caches an NXDOMAIN under type ANY with the negative TTL (RFC 2308).
        cache = self._resolver.cache
        cached = None if cache is None else cache.get((qname, dns.rdatatype.ANY, dns.rdataclass.IN))
        if cached is not None:
            self._remember(key, [], cached.expiration)

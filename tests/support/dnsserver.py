"""A real DNS server on loopback for tests and benches (dnslib), UDP and TCP on one port.

    with LocalDns({"example.com.": [("TXT", "v=spf1 -all"), ("A", "127.0.0.2")]}) as dns:
        settings = settings_from_mapping({"dns": {"nameservers": [dns.address]}})

Records are ``(type, value)`` or ``(type, value, ttl)``; types TXT A AAAA MX PTR CNAME NS.
MX values are ``"10 mx.example.com."``; TXT values longer than 255 bytes are split into
character-strings as a real zone would. Unknown names answer NXDOMAIN. Names listed in
``timeout`` get no reply at all (the client times out); names in ``servfail`` answer
SERVFAIL. ``set``/``remove`` change the zone while the server runs; ``queries`` records
every question asked as ``(name, type)``, so tests can see what a cache saved.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

from dnslib import AAAA, CNAME, MX, NS, PTR, QTYPE, RCODE, RR, TXT, A, DNSError, DNSRecord
from dnslib.server import DNSLogger, DNSServer

Record = tuple[Any, ...]  # (type, value) or (type, value, ttl)
Zone = Mapping[str, Sequence[Record]]


def _norm(name: str) -> str:
    return name.lower().rstrip(".") + "."


class _Drop(DNSError):  # type: ignore[misc]
    """Raised inside the handler to send no reply (dnslib logs DNSError and moves on)."""


def _quiet_logger() -> Any:
    return DNSLogger(log="-request,-reply,-truncated,-error,-recv,-send,-data")


def _rdata(rtype: str, value: Any) -> Any:
    if rtype == "TXT":
        data = value.encode() if isinstance(value, str) else bytes(value)
        return TXT([data[i : i + 255] for i in range(0, len(data), 255)] or [b""])
    if rtype == "A":
        return A(value)
    if rtype == "AAAA":
        return AAAA(value)
    if rtype == "MX":
        if isinstance(value, str):
            pref, _, host = value.partition(" ")
            return MX(host.strip(), int(pref))
        return MX(value[1], int(value[0]))
    if rtype == "PTR":
        return PTR(value)
    if rtype == "CNAME":
        return CNAME(value)
    if rtype == "NS":
        return NS(value)
    raise ValueError(f"LocalDns does not serve {rtype} records")


class _ZoneResolver:
    def __init__(self, owner: LocalDns) -> None:
        self.owner = owner

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        qname = _norm(str(request.q.qname))
        qtype = QTYPE[request.q.qtype]
        self.owner.queries.append((qname, str(qtype)))
        if qname in self.owner.timeout:
            raise _Drop(f"dropping {qname}")
        reply = request.reply()
        if qname in self.owner.servfail:
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        zone = self.owner.zone
        name, hops = qname, 0
        while hops < 8:
            records = zone.get(name)
            if records is None:
                if name == qname:
                    reply.header.rcode = RCODE.NXDOMAIN
                return reply
            cname = [r for r in records if r[0] == "CNAME"]
            if cname and qtype != "CNAME":
                reply.add_answer(
                    RR(name, QTYPE.CNAME, rdata=_rdata("CNAME", cname[0][1]), ttl=_ttl(cname[0]))
                )
                name, hops = _norm(cname[0][1]), hops + 1
                continue
            for rec in records:
                if rec[0] == qtype:
                    reply.add_answer(
                        RR(
                            name,
                            getattr(QTYPE, rec[0]),
                            rdata=_rdata(rec[0], rec[1]),
                            ttl=_ttl(rec),
                        )
                    )
            return reply
        return reply


def _ttl(rec: Record) -> int:
    return int(rec[2]) if len(rec) > 2 else 300


class LocalDns:
    """Authoritative-looking loopback DNS server; start with ``with`` or ``start()``."""

    def __init__(
        self,
        zone: Zone | None = None,
        *,
        timeout: Iterable[str] = (),
        servfail: Iterable[str] = (),
        host: str = "127.0.0.1",
    ) -> None:
        self.zone: dict[str, list[Record]] = {}
        for name, records in (zone or {}).items():
            self.set(name, records)
        self.timeout: set[str] = {_norm(n) for n in timeout}
        self.servfail: set[str] = {_norm(n) for n in servfail}
        self.queries: list[tuple[str, str]] = []
        self.host = host
        self.port = 0
        self._servers: list[DNSServer] = []
        self._threads: list[threading.Thread] = []

    @property
    def address(self) -> str:
        """``host:port`` for ``[dns] nameservers``."""
        return f"{self.host}:{self.port}"

    def set(self, name: str, records: Sequence[Record]) -> None:
        for rec in records:
            _rdata(rec[0].upper(), rec[1])  # fail early on a bad record
        self.zone[_norm(name)] = [(r[0].upper(), *r[1:]) for r in records]

    def remove(self, name: str) -> None:
        self.zone.pop(_norm(name), None)

    def add_timeout(self, name: str) -> None:
        self.timeout.add(_norm(name))

    def start(self) -> LocalDns:
        for _attempt in range(20):
            udp = DNSServer(_ZoneResolver(self), address=self.host, port=0, logger=_quiet_logger())
            port = udp.server.server_address[1]
            try:
                tcp = DNSServer(
                    _ZoneResolver(self),
                    address=self.host,
                    port=port,
                    tcp=True,
                    logger=_quiet_logger(),
                )
            except OSError:
                udp.server.server_close()
                continue
            self.port = port
            self._servers = [udp, tcp]
            for server in self._servers:
                # A short poll interval keeps stop() quick (dnslib's start_thread uses 0.5 s).
                thread = threading.Thread(
                    target=server.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
                )
                thread.start()
                self._threads.append(thread)
            return self
        raise OSError("no free loopback port for UDP and TCP together")

    def stop(self) -> None:
        for server in self._servers:
            server.server.shutdown()
            server.server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers = []
        self._threads = []

    def __enter__(self) -> LocalDns:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


__all__ = ["LocalDns", "Record", "Zone"]

"""Authenticator: DKIM, SPF, DMARC and ARC for one message, without blocking the loop.

Order of work, all DNS through the one shared resolver:
1. scan the header block (on the loop when small and plain, else in a thread): key
   names to fetch, the From domain;
2. at once: fetch every DKIM/ARC key, run SPF (pyspf on the loop over answers fetched
   asynchronously, see auth/spf.py), discover the DMARC record;
3. verify signatures with only the prefetched keys, in a child process fed over a pipe
   (``[auth] workers``, relay/proc/pipes.py: its own ``relay.auth.cryptoproc`` children, or
   the classifier's ``relay.analysis`` children when given them with ``share``) or, with
   ``workers = 0``, in a thread;
4. evaluate DMARC alignment from the results.
A DNS failure turns into temperror for the check that needed it; nothing here raises for
bad input.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from functools import partial

from publicsuffixlist import PublicSuffixList

from relay.auth import dmarc
from relay.auth.batch import Batcher
from relay.auth.domains import OrgDomains
from relay.auth.headerscan import HeaderScan, quick_scan, scan_headers
from relay.auth.results import ArcResult, AuthResults, DkimResults, SpfResult
from relay.auth.spf import SpfCache, check_spf, check_spf_cached
from relay.auth.wire import TEMPERROR, VERIFY, KeyRecords, decode_answer, encode_request
from relay.config import AuthSettings
from relay.dns import DnsTemporaryError, Resolver
from relay.errors import WorkerBusy, WorkerDied
from relay.message import Message
from relay.proc.pipes import PipeWorkers

log = logging.getLogger("relay.auth")

Verifier = Callable[[bytes, KeyRecords, int, bool], tuple[DkimResults, ArcResult]]

MAX_SIGNATURES = 10  # DKIM-Signature fields verified per message; the rest are listed
# Header blocks up to this size are scanned on the loop (0.35 ms at most, measured); a
# thread hop alone costs ~0.1 ms of CPU, more than scanning an ordinary 3 KB block.
SCAN_ON_LOOP = 32 * 1024
CRYPTO_MODULE = "relay.auth.cryptoproc"  # the child each ``[auth] workers`` process runs
# Seconds one message's verification may take in a child before the child is killed (an
# ordinary message takes well under a millisecond; 10 signatures over a 50 MB body ~1 s):
# the default of ``[auth] timeout``.
VERIFY_TIMEOUT = 30.0
# Messages waiting for the verification children, per relay worker, beyond which one more
# fails at once (its auth facts fail): the default of ``[auth] max_pending``.
MAX_PENDING = 256


class Authenticator:
    """Long-lived service (one per relay process); ``start`` and ``close`` it on the
    lifespan."""

    def __init__(
        self,
        resolver: Resolver,
        *,
        executor: Executor | None = None,
        executor_workers: int = 1,
        processes: int = 0,
        psl: PublicSuffixList | None = None,
        max_signatures: int = MAX_SIGNATURES,
        verify_timeout: float = VERIFY_TIMEOUT,
        max_pending: int = MAX_PENDING,
        shared: bool = False,
    ) -> None:
        """Where signatures are verified: ``shared``: in the children ``share`` hands over
        (the classifier's, which verify too), ``processes`` ignored; ``processes`` > 0:
        that many child processes of our own fed over pipes by the loop
        (relay/proc/pipes.py: no helper thread takes the GIL from the loop); else
        ``executor`` (not ours to close; ``executor_workers`` batches run in it at once);
        else one thread of our own. ``verify_timeout`` and ``max_pending`` bound the
        children (relay/proc/pipes.py)."""
        self.resolver = resolver
        self.verify_timeout = verify_timeout
        self.max_signatures = max_signatures
        self.orgs = OrgDomains(psl)
        self.spf_cache = SpfCache()
        # Large or hostile header blocks are scanned here, off the loop (see check).
        self._io = ThreadPoolExecutor(1, thread_name_prefix="relay-auth-scan")
        self._workers: PipeWorkers | None = None
        self._own_workers = False  # ours to start and close (not shared)
        self._op = b""  # the request prefix the children need (VERIFY when shared)
        # Requests held in children, bounded here rather than by the pool: a shared pool
        # also holds the classifier's requests, which have their own bound.
        self._max_pending = max_pending
        self._held = 0
        self._owned: ThreadPoolExecutor | None = None
        self._batcher: Batcher[tuple[DkimResults, ArcResult]] | None = None
        self._verify_here: Verifier | None = None  # verify_message, when it runs here
        self.shared = shared
        if shared:
            self._op = VERIFY
        elif processes > 0:
            self._workers = PipeWorkers(CRYPTO_MODULE, processes, name="relay-auth")
            self._own_workers = True
        else:
            # Only here does this process import the verifier: dkimpy, PyNaCl and
            # cryptography cost a worker that verifies in children ~8 MiB for nothing.
            from relay.auth.verify import verify_message

            self._verify_here = verify_message
            if executor is None:
                executor = self._owned = ThreadPoolExecutor(1, thread_name_prefix="relay-auth")
            self._batcher = Batcher(executor, in_flight=executor_workers)

    @classmethod
    def from_settings(
        cls,
        resolver: Resolver,
        settings: AuthSettings,
        psl: PublicSuffixList | None = None,
        *,
        shared: bool = False,
    ) -> Authenticator:
        """``[auth] workers = N`` > 0 verifies in N processes; 0 in one thread here.
        ``shared`` (N > 0 and the classifier on): in the classifier's children, handed over
        with ``share`` (assembly.open_classifier)."""
        return cls(
            resolver,
            processes=settings.workers,
            psl=psl,
            verify_timeout=settings.timeout,
            max_pending=settings.max_pending,
            shared=shared and settings.workers > 0,
        )

    def share(self, children: PipeWorkers) -> None:
        """Verify in ``children`` from now on: child processes that answer ``VERIFY``
        requests (``relay.analysis``), owned by the classifier that opened them. Called
        again at a model hot swap with the new classifier's pool: a verification in flight
        in the old pool finishes there, or is sent once more to this one when the old pool
        closes under it."""
        if not self.shared:
            raise ValueError("share: this authenticator verifies in children of its own")
        self._workers = children

    @property
    def pids(self) -> list[int]:
        """The verification child processes now (none when verifying in a thread)."""
        return [] if self._workers is None else self._workers.pids

    @property
    def pending(self) -> int:
        """Messages sent to the verification children (or waiting for one to start) and
        not answered yet."""
        return self._held

    async def start(self) -> None:
        """Start the verification processes now rather than on the first message (shared
        ones are started by the classifier that opens them)."""
        if self._workers is not None and self._own_workers:
            await self._workers.start()

    async def close(self) -> None:
        self._io.shutdown(wait=False, cancel_futures=True)
        if self._workers is not None and self._own_workers:
            await self._workers.close()
        if self._owned is not None:
            await asyncio.to_thread(self._owned.shutdown, wait=True, cancel_futures=True)

    async def _verify(
        self, message: Message, keys: dict[bytes, bytes | None], arc: bool
    ) -> tuple[DkimResults, ArcResult]:
        if self._batcher is not None and self._verify_here is not None:
            call = partial(self._verify_here, message.raw, keys, self.max_signatures, arc)
            return await self._batcher.run(call)
        if self._held >= self._max_pending:
            raise WorkerBusy(f"relay-auth: {self._held} requests pending already")
        request: tuple[bytes, ...] = encode_request(message.raw, keys, self.max_signatures, arc)
        if self._op:
            request = (self._op, *request)
        self._held += 1
        try:
            return decode_answer(await self._call(request))
        finally:
            self._held -= 1

    async def _call(self, request: tuple[bytes, ...]) -> bytes:
        workers = self._workers
        if workers is None:  # shared, and no classifier has handed its children over
            raise WorkerDied("relay-auth: no verification processes")
        # A dead process is replaced and the message sent once more; one that overruns the
        # timeout is killed and the message's auth facts fail, as for a death twice.
        try:
            return await workers.call(*request, kill_after=self.verify_timeout, retry=True)
        except WorkerDied:
            if not workers.closed or self._workers is workers or self._workers is None:
                raise
            # A model hot swap closed the pool this request was in (not the request's
            # fault): once more in the pool that replaced it.
            return await self._workers.call(*request, kill_after=self.verify_timeout, retry=True)

    async def check(self, message: Message) -> AuthResults:
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        block = message.header_block
        # The message's own split of its header (shared with the header facts and the stamps),
        # only for a block small enough to split on the loop.
        fields = message.header_split.fields if len(block) <= SCAN_ON_LOOP else None
        scan = quick_scan(block, self.max_signatures, SCAN_ON_LOOP, fields)
        if scan is None:  # large or hostile: the full scan in a thread
            scan = await loop.run_in_executor(self._io, scan_headers, block, self.max_signatures)
        # With a warm cache every answer is at hand: no tasks, no loop turns (~45 us a
        # message saved). Anything missing: all three concurrently, as answers arrive.
        ip, mail_from, helo = message.peer.ip, message.envelope.mail_from, message.peer.helo or ""
        cached = self._cached(scan, ip, mail_from, helo)
        if cached is None:
            cached = await asyncio.gather(
                self._fetch_keys(scan),
                check_spf(self.resolver, ip, mail_from, helo, self.spf_cache),
                dmarc.discover(self.resolver, self.orgs, scan.from_domain, scan.from_error),
            )
        keys, (spf_result, helo_result), found = cached
        dkim_results, arc_result = await self._verify(message, keys, scan.arc_present)
        dmarc_result = dmarc.evaluate(
            found, self.orgs, dkim_results, spf_result, message.raw[:65536]
        )
        return AuthResults(
            dkim=dkim_results,
            spf=spf_result,
            spf_helo=helo_result,
            dmarc=dmarc_result,
            arc=arc_result,
            from_domain=scan.from_domain,
            client_ip=message.peer.ip,
            seconds=time.perf_counter() - start,
        )

    async def _fetch_keys(self, scan: HeaderScan) -> dict[bytes, bytes | None]:
        names = list(dict.fromkeys(scan.dkim_keys + scan.arc_keys))
        records = await asyncio.gather(*(self._key(n) for n in names))
        return dict(zip(names, records, strict=True))

    def _cached(
        self, scan: HeaderScan, ip: str, mail_from: str, helo: str
    ) -> tuple[dict[bytes, bytes | None], tuple[SpfResult, SpfResult], dmarc.Discovery] | None:
        """Keys, SPF and DMARC discovery from the caches alone; None when one needs DNS."""
        keys = self._cached_keys(scan)
        if keys is None:
            return None
        spf = check_spf_cached(self.resolver, ip, mail_from, helo, self.spf_cache)
        if spf is None:
            return None
        found = dmarc.discover_cached(self.resolver, self.orgs, scan.from_domain, scan.from_error)
        if found is None:
            return None
        return keys, spf, found

    def _cached_keys(self, scan: HeaderScan) -> dict[bytes, bytes | None] | None:
        """Every key record from the resolver's cache, or None when one is not cached."""
        keys: dict[bytes, bytes | None] = {}
        for name in scan.dkim_keys + scan.arc_keys:
            records = self.resolver.peek_txt(name.decode("ascii"))
            if records is None:
                return None
            keys[name] = _pick_key(records)
        return keys

    async def _key(self, name: bytes) -> bytes | None:
        try:
            records = await self.resolver.txt(name.decode("ascii"))
        except DnsTemporaryError:
            return TEMPERROR
        return _pick_key(records)


def _pick_key(records: list[bytes]) -> bytes | None:
    # RFC 6376 3.6.2.2: several records at one name: take the first that is a key.
    for record in records:
        if b"p=" in record:
            return record
    return records[0] if records else None

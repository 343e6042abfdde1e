"""Fact registry and the lazy, once-per-message fact evaluator.

A fact is a named, typed value about one message with a privacy tier and declared
dependencies, computed by one async function. Facts never decide; policies read them.
A family module (``facts/auth.py``, ``facts/headers.py`` ...) exports ``FACTS``, a tuple of
FactSpec, and is listed once in ``facts/__init__.py``.

Rules of the registry, checked when it is built:
- names are unique; dependencies exist; there is no cycle;
- a fact's tier is at least the tier of each dependency, so a cheap-looking fact can
  never hide that it read the body.

Failures: a fact that raises FactError itself says "missing" (its input is absent: no
sender domain, no list supplied); that is normal. Anything else (the state backend down,
a DNS timeout, the classifier failing, a bug) is a *failure*: ``failure_kind`` sorts it
into a small closed set (``FailureKind``) and ``Facts`` tells its ``FactFailures`` sink
(ops/faults.py: counted, rate-limited log, /readyz degraded) once per failing fact, not
again for facts that only inherited the error from a dependency. The message flows on
either way.

Services (DNS resolver, classifier client, state store, lists ...) reach compute functions
through ``ctx.service(KEY)``: a fact declares the services it uses in ``needs`` (keys from
``facts/services.py``), may use only those, and gets FactError when one is missing. The
typed, frozen ``Services`` is built once, by ``assembly.open_services``, so families do not
import each other and the relay can refuse a policy whose facts need a missing service.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import BrokenExecutor
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol, TypeVar

from relay.dns import DnsTemporaryError
from relay.errors import FactError, ModelError, StateError, WorkerFailure, WorkerTimeout
from relay.facts.services import CLASSIFIER, Service, Services
from relay.message import Message
from relay.verdict import FactRead, FailureKind, Tier

S = TypeVar("S")

__all__ = [
    "Compute",
    "FactContext",
    "FactFailures",
    "FactRegistry",
    "FactSpec",
    "FactType",
    "Facts",
    "FailureKind",
    "Service",
    "Services",
    "failure_kind",
    "missing_services",
]


class FactType(StrEnum):
    """Types a fact can have; policies are type-checked against these at load."""

    BOOL = "bool"
    INT = "int"
    FLOAT = "float"
    STR = "str"  # may be None when absent (e.g. list_id)
    STR_LIST = "list[str]"
    OBJECT = "object"  # structured, JSON-able mapping (e.g. per-signature DKIM results)


def _kind_of(exc: BaseException) -> FailureKind | None:
    """The kind one exception in a chain stands for, if it names one."""
    if isinstance(exc, StateError):
        return FailureKind.STATE
    if isinstance(exc, DnsTemporaryError):  # before TimeoutError: DNS timeouts are DNS
        return FailureKind.DNS
    if isinstance(exc, TimeoutError | WorkerTimeout):
        return FailureKind.TIMEOUT
    if isinstance(exc, ModelError | BrokenExecutor):
        return FailureKind.MODEL
    if isinstance(exc, WorkerFailure):  # after ModelError: the classifier's wraps its own
        return FailureKind.WORKER
    return None


def failure_kind(exc: BaseException, needs: Iterable[Service[Any]] = ()) -> FailureKind | None:
    """The kind of failure ``exc`` (raised by a fact's computation) stands for, or None
    when the fact merely says it is missing (a plain FactError with no fault behind it).

    The chain (``raise ... from``, then implicit context) is walked outermost first, so
    a StateError wrapped in a FactError is still a state failure. A FactError with no
    known kind in its chain was raised on purpose ("no sender domain"): missing, None.
    Any other exception is a failure: in a fact that ``needs`` the classifier the
    model's (its pool raises whatever the worker raised), elsewhere OTHER (a bug).
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        kind = _kind_of(current)
        if kind is not None:
            return kind
        current = current.__cause__ or current.__context__
    if isinstance(exc, FactError):
        return None  # raised on purpose with no fault behind it: the fact is missing
    if CLASSIFIER in tuple(needs):
        return FailureKind.MODEL
    return FailureKind.OTHER


class FactFailures(Protocol):
    """Told of each fact failure (ops/faults.py); must never raise, never block."""

    def fact_failed(self, name: str, kind: FailureKind, error: BaseException) -> None: ...


class FactContext(Protocol):
    """What a compute function sees: the message, its declared services and dependencies."""

    @property
    def message(self) -> Message: ...

    def service(self, key: Service[S]) -> S: ...

    async def get(self, name: str) -> Any: ...


Compute = Callable[[FactContext], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class FactSpec:
    name: str
    type: FactType
    tier: Tier
    compute: Compute
    depends: tuple[str, ...] = ()
    doc: str = ""
    needs: tuple[Service[Any], ...] = ()  # the services it uses (facts/services.py)
    version: int = 1  # bump when the computation changes (keys the lab's fact cache)
    lab_only: bool = False  # oracle facts (consent, opt-out) a live receiver cannot know


class FactRegistry:
    """Validated set of FactSpecs."""

    def __init__(self, specs: Iterable[FactSpec]) -> None:
        by_name: dict[str, FactSpec] = {}
        for spec in specs:
            if spec.name in by_name:
                raise ValueError(f"fact {spec.name!r} is registered twice")
            by_name[spec.name] = spec
        for spec in by_name.values():
            for dep in spec.depends:
                if dep not in by_name:
                    raise ValueError(f"fact {spec.name!r} depends on unknown fact {dep!r}")
                if by_name[dep].tier > spec.tier:
                    raise ValueError(
                        f"fact {spec.name!r} ({spec.tier.label}) depends on {dep!r} "
                        f"({by_name[dep].tier.label}): a fact's tier must cover its inputs"
                    )
        self._specs: Mapping[str, FactSpec] = by_name
        for name in by_name:
            self._check_cycle(name, ())

    def _check_cycle(self, name: str, path: tuple[str, ...]) -> None:
        if name in path:
            raise ValueError("fact dependency cycle: " + " -> ".join((*path, name)))
        for dep in self._specs[name].depends:
            self._check_cycle(dep, (*path, name))

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __getitem__(self, name: str) -> FactSpec:
        return self._specs[name]

    def __iter__(self) -> Any:
        return iter(self._specs.values())

    def cache_version(self, name: str) -> int:
        """The version the lab's fact cache keys ``name`` on: its own ``version`` when it
        depends on nothing, else a digest of it and its inputs' cache versions, so that a
        fact computed from a changed fact (``body_text`` -> ``bulk_fingerprint``) is never
        served from a cache entry made from the old input."""
        spec = self._specs[name]
        if not spec.depends:
            return spec.version
        deps = ",".join(f"{d}={self.cache_version(d)}" for d in sorted(spec.depends))
        return zlib.crc32(f"{spec.version}|{deps}".encode())

    def closure(self, names: Iterable[str]) -> frozenset[str]:
        """``names`` and every fact they depend on, transitively (unknown names kept)."""
        seen: set[str] = set()
        todo = list(names)
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            if name in self._specs:
                todo.extend(self._specs[name].depends)
        return frozenset(seen)

    def names(self) -> list[str]:
        return sorted(self._specs)


def missing_services(
    registry: FactRegistry, names: Iterable[str], services: Services
) -> list[tuple[str, str, Service[Any]]]:
    """(fact read, fact that needs the service, service) for every fact in ``names`` that
    needs, itself or through a dependency, a service that is not configured.

    Lab-only facts are left out: a live relay never has their lists, and a regime that
    reads them treats them as missing (FactError), by design (facts/oracle.py).
    """
    found: list[tuple[str, str, Service[Any]]] = []
    for read in sorted(set(names)):
        seen: set[str] = set()
        stack = [read] if read in registry else []
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            spec = registry[name]
            if spec.lab_only:
                continue
            found.extend(
                (read, name, key)
                for key in spec.needs
                if getattr(services, key.field) is None and not key.optional
            )
            stack.extend(spec.depends)
    return found


def _jsonable(value: Any) -> Any:
    """A JSON-safe copy of a fact's value for its FactRead. The exact built-in types come
    first (three times faster on the auth_results mapping, read for every message);
    subclasses and other containers take the general path."""
    kind = type(value)
    if kind is str or kind is int or kind is float or kind is bool or value is None:
        return value
    if kind is dict:
        return {k if type(k) is str else str(k): _jsonable(v) for k, v in value.items()}
    if kind is list or kind is tuple:
        return [_jsonable(v) for v in value]
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    return str(value)


class Facts:
    """Per-message lazy fact store: each fact computed at most once, on first request.

    A failed computation is remembered too: ``get`` raises FactError with the reason every
    time it is asked, so a policy can treat the fact as missing and say why.
    """

    def __init__(
        self,
        registry: FactRegistry,
        message: Message,
        services: Services,
        preset: Mapping[str, Any] | None = None,
        failures: FactFailures | None = None,
    ) -> None:
        self.registry = registry
        self.message = message
        self.services = services
        self._tasks: dict[str, asyncio.Future[Any]] = {}
        self._reads: dict[str, FactRead] = {}
        self._failures = failures
        # Errors already reported: a fact that fails because its dependency did re-raises
        # the same object, and one outage must count once, under the fact that met it.
        self._reported: list[BaseException] = []
        # Values known in advance (the lab's cache, tests): recorded as read, at no cost.
        for name, value in (preset or {}).items():
            spec = registry[name]
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            fut.set_result(value)
            self._tasks[name] = fut
            self._reads[name] = FactRead(name, spec.tier, _jsonable(value), 0.0, None)

    async def get(self, name: str) -> Any:
        """The fact's value, computed at most once per message. The first reader computes
        it in its own task (a task and a shield per fact cost about 4 us each, some 15
        facts a message); readers meanwhile wait for that result. Should the first reader
        be cancelled, the computation stops with it and the next reader starts again."""
        while True:
            pending = self._tasks.get(name)
            if pending is None:
                return await self._first_read(name)
            if pending.done():  # read again (views, stamps): no shield, no extra future
                return pending.result()
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if not pending.cancelled() or (current is not None and current.cancelling()):
                    raise  # this reader was cancelled, not the one computing
                # the computing reader was cancelled: this one computes it instead

    async def _first_read(self, name: str) -> Any:
        if name not in self.registry:
            raise FactError(f"unknown fact {name!r}")
        result: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._tasks[name] = result
        try:
            value = await self._compute(self.registry[name])
        except asyncio.CancelledError:
            del self._tasks[name]  # unknown, not failed: a later read computes it again
            result.cancel()
            raise
        except BaseException as exc:
            result.set_exception(exc)
            result.exception()  # marked retrieved: nobody else may be waiting for it
            raise
        result.set_result(value)
        return value

    async def _compute(self, spec: FactSpec) -> Any:
        start = time.perf_counter()
        try:
            value = await spec.compute(_Scoped(self, spec))
        except FactError as exc:
            self._reads[spec.name] = FactRead(
                spec.name, spec.tier, None, time.perf_counter() - start, str(exc)
            )
            self._failed(spec, exc, exc)
            raise
        except Exception as exc:  # a fact's bug or outage must never crash the session
            reason = f"{type(exc).__name__}: {exc}"
            self._reads[spec.name] = FactRead(
                spec.name, spec.tier, None, time.perf_counter() - start, reason
            )
            error = FactError(f"{spec.name}: {reason}")
            self._failed(spec, exc, error)
            raise error from exc
        self._reads[spec.name] = FactRead(
            spec.name, spec.tier, _jsonable(value), time.perf_counter() - start, None
        )
        return value

    def _failed(self, spec: FactSpec, exc: BaseException, raised: BaseException) -> None:
        """Tell the sink of a failure (not a "missing"), once per outage per message."""
        if self._failures is None or any(exc is seen for seen in self._reported):
            return
        self._reported.append(raised)
        kind = failure_kind(exc, spec.needs)
        if kind is None:
            return
        with contextlib.suppress(Exception):  # an observer: it must not cost the message
            self._failures.fact_failed(spec.name, kind, exc)

    def computed(self, name: str) -> bool:
        return name in self._reads

    def reads(self) -> tuple[FactRead, ...]:
        return tuple(self._reads.values())

    def read(self, name: str) -> FactRead | None:
        """The record of one computed (or failed) fact; None while not computed."""
        return self._reads.get(name)

    def highest_tier(self) -> Tier | None:
        tiers = [r.tier for r in self._reads.values()]
        return max(tiers) if tiers else None


class _Scoped:
    """The view of Facts a compute function gets: only its declared dependencies."""

    __slots__ = ("_facts", "_spec")

    def __init__(self, facts: Facts, spec: FactSpec) -> None:
        self._facts = facts
        self._spec = spec

    @property
    def message(self) -> Message:
        return self._facts.message

    def service(self, key: Service[S]) -> S:
        if key not in self._spec.needs:
            raise FactError(f"fact {self._spec.name!r} used undeclared service {key.field!r}")
        return self._facts.services.require(key)

    async def get(self, name: str) -> Any:
        if name not in self._spec.depends:
            raise FactError(f"fact {self._spec.name!r} read undeclared dependency {name!r}")
        return await self._facts.get(name)

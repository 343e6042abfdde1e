"""The lab's environment: which registry and services facts run with, in any process.

A LabEnv is a small picklable description (settings, DNS mode, trusted authserv-ids);
each process rebuilds the same registry and services from it with ``lab_services``, which
goes through the relay's own composition root (``relay.app.open_services``), so facts run
with the services they have live. Offline, the DNS resolver is left out and the
authentication facts read trusted Authentication-Results fields instead (offline_auth).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import sqlite3
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from relay.config import ModelSettings, Settings, StateSettings
from relay.errors import StateError
from relay.facts import FactRegistry, Services, default_registry
from relay.facts.oraclelists import OracleLists
from relay.lab.offline_auth import HeaderAuth, offline_registry
from relay.secretkey import SecretKey
from relay.state import SqliteState, StateStore

T = TypeVar("T")

# Bump when the lab changes how it rebuilds a message (envelope, peer, time) or a fact
# override, so cached values from the old reconstruction are not reused.
LAB_FORMAT = 1


@dataclass(frozen=True, slots=True)
class LabEnv:
    settings: Settings
    trusted_authserv_ids: tuple[str, ...] = ()
    inputs: Path | None = None  # lab-only oracle lists (consent.tsv ...; facts/oracle.py)

    @property
    def offline(self) -> bool:
        return not self.settings.dns.nameservers

    def dns_description(self) -> dict[str, Any]:
        if self.offline:
            return {
                "mode": "offline",
                "trusted_authserv_ids": list(self.trusted_authserv_ids),
                "note": "authentication facts read from Authentication-Results fields of "
                "the trusted authserv-ids; 'none' where none was recorded",
            }
        return {
            "mode": "resolver",
            "nameservers": [f"{h}:{p}" for h, p in self.settings.dns.nameservers],
        }

    def inputs_description(self) -> dict[str, Any]:
        if self.inputs is None:
            return {"dir": None, "lists": [], "note": "no lab inputs: oracle facts missing"}
        return {
            "dir": str(self.inputs),
            "lists": sorted(p.name for p in self.inputs.glob("*.tsv")),
        }

    def model_description(self) -> dict[str, Any]:
        model = self.settings.model
        if not model.enabled:
            return {"path": None, "sha256": None}
        return {"path": str(model.path), "sha256": _file_digest(model.path)}

    def registry(self) -> FactRegistry:
        base = default_registry()
        if not self.offline:
            return base
        return offline_registry(
            base, HeaderAuth(frozenset(i.lower() for i in self.trusted_authserv_ids))
        )

    def key(self) -> str:
        """Digest of everything besides the message that fact values depend on."""
        model = self.settings.model
        parts = {
            "lab": LAB_FORMAT,
            "dns": self.dns_description(),
            "model": _file_digest(model.path) if model.enabled else "disabled",
            "authserv": sorted(self.trusted_authserv_ids),
            "inputs": None
            if self.inputs is None
            else {p.name: _file_digest(p) for p in sorted(self.inputs.glob("*.tsv"))},
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _file_digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError:
        return "missing"


def lab_settings(env: LabEnv, state_dir: Path, *, classifier: bool = True) -> Settings:
    """The relay's settings with a private state file and one classifier process, at the
    pool worker's own priority (no event loop here whose replies a lower one would speed)."""
    s = env.settings
    return dataclasses.replace(
        s,
        state=StateSettings(backend="sqlite", path=state_dir / "state.sqlite3"),
        model=ModelSettings(
            enabled=s.model.enabled and classifier, path=s.model.path, workers=1, nice=0
        ),
    )


@contextlib.asynccontextmanager
async def lab_services(
    env: LabEnv, state_dir: Path, *, stateful: bool, classifier: bool = True
) -> AsyncIterator[Services]:
    """Services as ``relay serve`` builds them, minus what the lab must not use.

    ``stateful=False`` (the parallel pass) leaves the state store out, so a fact that
    remembers across messages fails there and is computed later, in corpus time order.
    ``classifier=False`` skips loading the model (slow for a large vocabulary) where no
    fact will need it: the ordered pass and the start-up check.
    """
    from relay.assembly import open_services

    # lab_settings points the state at a fresh SQLite file (never the relay's store,
    # maybe Redis), which goes unused: the ordered pass gets a PrivateState of its own
    # below, and the parallel pass none.
    settings = lab_settings(env, state_dir, classifier=classifier)
    async with contextlib.AsyncExitStack() as stack:
        # A throwaway key: the lab's store is its own, fresh and private to this run.
        services = await open_services(settings, stack, key=SecretKey.generate())
        state: StateStore | None = None
        if stateful:
            state = await PrivateState(
                state_dir / "lab-state.sqlite3", key=SecretKey.generate()
            ).open()
            stack.push_async_callback(state.close)
        yield dataclasses.replace(
            services,
            resolver=None if env.offline else services.resolver,
            state=state,
            oracle=None if env.inputs is None else OracleLists.load(env.inputs),
        )


class PrivateState(SqliteState):
    """The lab's own state store: the relay's SQLite backend (same SQL, same semantics),
    called inline. The relay hops to a store thread so that a live event loop never waits
    on disk; the lab's ordered replay makes one call at a time and waits for each anyway,
    and the hops were 40% of its time (docs/lab.md "Pass 2 on the cluster")."""

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return fn(*args)
        except sqlite3.Error as exc:
            raise StateError(f"{self._WHAT} {self.path}: {exc}") from exc


async def check_services(env: LabEnv) -> None:
    """Open and close the lab's services once, so a missing model or a bad input list
    fails at once in the main process, not in every worker after the corpus is read."""
    if env.settings.model.enabled:
        from relay.classifier.model import read_card

        read_card(env.settings.model.path)  # missing, unaudited or changed: ModelError now
    with tempfile.TemporaryDirectory(prefix="relay-lab-check-") as tmp:
        async with lab_services(env, Path(tmp), stateful=False, classifier=False):
            pass

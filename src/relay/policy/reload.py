"""Hot reload: swap in a new policy between messages, keep the old one on any error.

The relay (app.py) calls ``reload_policy`` on SIGHUP; ``relay policy reload`` sends that
SIGHUP to the pid in the relay's pid file. Sessions in flight hold the Decider they
captured when their transaction started, so they finish under the old policy.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

from relay.contracts import Observer
from relay.errors import PolicyError
from relay.facts.base import FactRegistry, missing_services
from relay.facts.services import Services
from relay.policy.engine import Policy
from relay.policy.holder import DeciderHolder
from relay.policy.loader import load_policy
from relay.proc.celsandbox import ConditionSandbox

log = logging.getLogger("relay.policy")


def service_problems(policy: Policy, registry: FactRegistry, services: Services) -> list[str]:
    """One line per fact ``policy`` reads (itself or through a dependency) whose service
    is not configured; empty when every service it needs is there."""
    return [
        f"policy {policy.name!r} ({policy.source}) reads {read!r}"
        + ("" if needer == read else f" (through {needer!r})")
        + f", whose {key.field} service is not configured"
        + (f" ({key.setting})" if key.setting else "")
        for read, needer, key in missing_services(registry, policy.fact_names, services)
    ]


def reload_policy(
    holder: DeciderHolder,
    path: Path,
    registry: FactRegistry,
    observer: Observer,
    services: Services | None = None,
    sandbox: ConditionSandbox | None = None,
) -> bool:
    """Load ``path`` and swap it into ``holder``; on PolicyError (or, given ``services``,
    a fact whose service is not configured) log every problem, count the failure and keep
    the running policy. Returns whether the swap happened."""
    try:
        policy = load_policy(path, registry, sandbox)
        if services is not None:
            problems = service_problems(policy, registry, services)
            if problems:
                raise PolicyError(problems)
    except PolicyError as exc:
        for problem in exc.problems:
            log.error("policy reload failed, keeping %s: %s", holder.current.name, problem)
        observer.policy_reload(False)
        return False
    holder.swap(policy)
    observer.policy_reload(True)
    log.info(
        "policy reloaded: name=%s mode=%s rules=%d generation=%d",
        policy.name,
        policy.mode.value,
        len(policy.rules),
        holder.generation,
    )
    return True


def read_pid(pidfile: Path) -> int:
    """The pid written by the running relay; PolicyError if absent or malformed."""
    try:
        text = pidfile.read_text(encoding="ascii").strip()
    except OSError as exc:
        raise PolicyError([f"{pidfile}: cannot read pid file: {exc.strerror}"]) from None
    if not text.isdigit() or int(text) <= 1:
        raise PolicyError([f"{pidfile}: not a pid: {text[:20]!r}"])
    return int(text)


def signal_reload(pidfile: Path) -> int:
    """Send SIGHUP to the relay named by ``pidfile``; returns its pid."""
    pid = read_pid(pidfile)
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise PolicyError([f"{pidfile}: no process {pid} (stale pid file?)"]) from None
    except PermissionError:
        raise PolicyError([f"{pidfile}: not allowed to signal process {pid}"]) from None
    return pid

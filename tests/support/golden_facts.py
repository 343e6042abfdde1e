"""Golden fact cases: hand-written messages in tests/golden/facts/ and their expected facts.

``expected.toml`` holds one table per file::

    ["newsletter.eml"]
    envelope = { mail_from = "a@b.example", rcpt_to = ["c@d.example"] }   # optional
    peer = { ip = "192.0.2.1", helo = "mx.b.example" }                      # optional
    time = 2026-03-10T09:00:00Z         # required: the message's received_at
    preset = { dkim = { ... } }         # facts of other families, given rather than computed
    missing = ["consent_listed"]        # facts that must fail (FactError)
    ["newsletter.eml".expect]
    list_id = "weekly.shop.example.co.uk"
    commercial_probability = { min = 0.8, max = 1.0 }   # a range for floats

A test module checks the expectations that belong to its family; ``CHECKED`` names those
families. The loader is strict, so nothing written is silently ignored: an unknown key, a
fact the registry does not know, or one no family test checks is an error naming the file
and the case. Every case pins its time, so date-dependent facts (opt-outs, state windows)
give the same answer on any day.
"""

from __future__ import annotations

import datetime as dt
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay.errors import FactError
from relay.facts import bulk, content, default_registry, headers, network, oracle
from relay.facts.base import FactRegistry, Facts, FactSpec, Services
from relay.message import Message, Peer

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "facts"
# Families whose test module (tests/test_facts_<name>.py) runs check_case on every case.
CHECKED: Mapping[str, tuple[FactSpec, ...]] = {
    "headers": headers.FACTS,
    "content": content.FACTS,
    "bulk": bulk.FACTS,
    "oracle": oracle.FACTS,
    "network": network.FACTS,
}
_KEYS = {
    "envelope": dict,
    "peer": dict,
    "time": dt.datetime,
    "preset": dict,
    "missing": list,
    "expect": dict,
}
_ENVELOPE_KEYS = {"mail_from", "rcpt_to"}
_PEER_KEYS = {"ip", "port", "helo"}


class GoldenCaseError(Exception):
    """expected.toml says something the loader cannot check."""


@dataclass(frozen=True)
class Case:
    file: str
    data: dict[str, Any]

    @property
    def expect(self) -> dict[str, Any]:
        return dict(self.data.get("expect", {}))

    @property
    def missing(self) -> list[str]:
        return list(self.data.get("missing", []))

    def message(self) -> Message:
        env = self.data.get("envelope", {})
        peer = self.data.get("peer", {})
        return Message.from_file_bytes(
            (GOLDEN / self.file).read_bytes(),
            received_at=self.data["time"].timestamp(),
            mail_from=env.get("mail_from", ""),
            rcpt_to=env.get("rcpt_to", ()),
            peer=Peer(ip=peer.get("ip", "127.0.0.1"), port=peer.get("port", 0),
                      helo=peer.get("helo")),
        )  # fmt: skip


def _problems(table: Any, registry: FactRegistry) -> list[str]:
    """What is wrong with one case table; empty when the loader can check all of it."""
    if not isinstance(table, dict):
        return ["must be a table"]
    problems = [f"unknown key {k!r}" for k in sorted(set(table) - set(_KEYS))]
    problems += [
        f"{k!r} must be a {kind.__name__}"
        for k, kind in _KEYS.items()
        if k in table and not isinstance(table[k], kind)
    ]
    if problems:
        return problems
    when = table.get("time")
    if when is None:
        problems.append("'time' is missing (the message's received_at, e.g. 2026-03-10T09:00:00Z)")
    elif when.tzinfo is None:
        problems.append("'time' needs an offset (Z or +hh:mm)")
    for key, allowed in (("envelope", _ENVELOPE_KEYS), ("peer", _PEER_KEYS)):
        problems += [f"unknown key '{key}.{k}'" for k in sorted(set(table.get(key, {})) - allowed)]
    checked = {spec.name for family in CHECKED.values() for spec in family}
    for key, names in (
        ("expect", table.get("expect", {})),
        ("missing", table.get("missing", [])),
        ("preset", table.get("preset", {})),
    ):
        for name in names:
            if name not in registry:
                problems.append(f"{key}: unknown fact {name!r}")
            elif key != "preset" and name not in checked:
                problems.append(f"{key}: no golden test checks fact {name!r} (see CHECKED)")
    return problems


def cases(path: Path = GOLDEN / "expected.toml") -> list[Case]:
    """Every case of ``path``; GoldenCaseError naming file and case for anything unchecked."""
    with path.open("rb") as fh:
        data = tomllib.load(fh)
    registry = default_registry()
    problems = [
        f"{path}: [{name!r}]: {problem}"
        for name, table in sorted(data.items())
        for problem in _problems(table, registry)
    ]
    if problems:
        raise GoldenCaseError("\n".join(problems))
    return [Case(name, table) for name, table in sorted(data.items())]


def family_cases(family: Iterable[FactSpec]) -> list[Case]:
    """Cases with at least one expectation about ``family``."""
    names = {spec.name for spec in family}
    return [c for c in cases() if names & (set(c.expect) | set(c.missing))]


def _matches(expected: Any, actual: Any) -> bool:
    if isinstance(expected, dict) and set(expected) <= {"min", "max"}:
        return bool(
            expected.get("min", float("-inf")) <= actual <= expected.get("max", float("inf"))
        )
    if isinstance(expected, float):
        return abs(float(actual) - expected) < 1e-9
    return bool(expected == actual)


async def check_case(
    case: Case, family: Iterable[FactSpec], registry: FactRegistry, services: Services
) -> Facts:
    """Compute the family's expected facts on the case; assert values and failures.

    Expectations about other families are theirs to check (the loader made sure each one
    belongs to a family in CHECKED)."""
    names = {spec.name for spec in family}
    preset = {k: v for k, v in case.data.get("preset", {}).items() if k in registry}
    facts = Facts(registry, case.message(), services, preset=preset)
    problems: list[str] = []
    for name, expected in case.expect.items():
        if name not in names:  # another family's
            continue
        try:
            actual = await facts.get(name)
        except FactError as exc:
            problems.append(f"{name}: failed ({exc}), expected {expected!r}")
            continue
        if not _matches(expected, actual):
            problems.append(f"{name}: got {actual!r}, expected {expected!r}")
    for name in case.missing:
        if name not in names:  # another family's
            continue
        try:
            actual = await facts.get(name)
        except FactError:
            continue
        problems.append(f"{name}: got {actual!r}, expected the fact to be missing")
    assert not problems, f"{case.file}:\n  " + "\n  ".join(problems)
    return facts


def covered(family: Iterable[FactSpec]) -> set[str]:
    """Facts of ``family`` that no golden case checks."""
    seen = {n for c in cases() for n in (*c.expect, *c.missing)}
    return {spec.name for spec in family} - seen

"""Golden fact cases: hand-written messages in tests/golden/facts/ and their expected facts.

``expected.toml`` holds one table per file::

    ["newsletter.eml"]
    envelope = { mail_from = "a@b.example", rcpt_to = ["c@d.example"] }   # optional
    peer = { ip = "192.0.2.1", helo = "mx.b.example" }                      # optional
    time = 1773133200.0                 # optional received_at (state windows)
    preset = { dkim = { ... } }         # facts of other families, given rather than computed
    missing = ["consent_listed"]        # facts that must fail (FactError)
    ["newsletter.eml".expect]
    list_id = "weekly.shop.example.co.uk"
    commercial_probability = { min = 0.8, max = 1.0 }   # a range for floats

A test module checks the expectations that belong to its family.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from relay.errors import FactError
from relay.facts.base import FactRegistry, Facts, FactSpec, Services
from relay.message import Message, Peer

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "facts"


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
        msg = Message.from_file_bytes(
            (GOLDEN / self.file).read_bytes(),
            mail_from=env.get("mail_from", ""),
            rcpt_to=env.get("rcpt_to", ()),
            peer=Peer(ip=peer.get("ip", "127.0.0.1"), port=peer.get("port", 0),
                      helo=peer.get("helo")),
        )  # fmt: skip
        if "time" in self.data:
            msg = replace(msg, received_at=float(self.data["time"]))
        return msg


def cases() -> list[Case]:
    with (GOLDEN / "expected.toml").open("rb") as fh:
        data = tomllib.load(fh)
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
    """Compute the family's expected facts on the case; assert values and failures."""
    names = {spec.name for spec in family}
    preset = {k: v for k, v in case.data.get("preset", {}).items() if k in registry}
    facts = Facts(registry, case.message(), services, preset=preset)
    problems: list[str] = []
    for name, expected in case.expect.items():
        if name not in names:
            continue
        try:
            actual = await facts.get(name)
        except FactError as exc:
            problems.append(f"{name}: failed ({exc}), expected {expected!r}")
            continue
        if not _matches(expected, actual):
            problems.append(f"{name}: got {actual!r}, expected {expected!r}")
    for name in case.missing:
        if name not in names:
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

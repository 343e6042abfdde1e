"""Golden policy cases (tests/golden/policy/cases.toml): real .eml files through real
policies with the default fact registry; facts that need DNS or the model are given in
advance. Asserts the action, the rules fired or skipped and the facts read, not scores."""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from publicsuffixlist import PublicSuffixList

from relay.facts import default_registry
from relay.facts.base import Facts, Services
from relay.message import Message
from relay.policy import load_policy

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "policy"


def cases() -> list[tuple[str, dict[str, Any]]]:
    with (GOLDEN / "cases.toml").open("rb") as fh:
        return sorted(tomllib.load(fh).items())


class NoReports:
    """A feedback store nobody has reported to: every domain has no reputation."""

    async def standings(
        self, kind: str, domains: Sequence[str], *, now: float
    ) -> list[tuple[float, float]]:
        return [(0.0, 0.0) for _ in domains]


@pytest.fixture(scope="module")
def services() -> Services:
    return Services(psl=PublicSuffixList(), reputation=NoReports())


@pytest.mark.parametrize(("name", "case"), cases(), ids=[n for n, _ in cases()])
async def test_golden_case(name: str, case: dict[str, Any], services: Services) -> None:
    registry = default_registry()
    policy = load_policy(REPO / case["policy"], registry)  # an unknown fact fails the case
    env = case.get("envelope", {})
    # The message's time is its own Date field (every policy golden .eml has one).
    message = Message.from_file_bytes(
        (GOLDEN / case["file"]).read_bytes(),
        mail_from=env.get("mail_from", ""),
        rcpt_to=env.get("rcpt_to", ()),
    )
    preset = case.get("preset", {})
    verdict = await policy.decide(message, Facts(registry, message, services, preset))
    expect = case["expect"]
    read = {f.name for f in verdict.facts}
    assert verdict.action.value == expect["action"], verdict.to_dict()
    assert sorted(h.rule for h in verdict.hits) == sorted(expect["fired"]), verdict.to_dict()
    if "forced_by" in expect:
        assert verdict.forced_by == expect["forced_by"]
    assert sorted(s.rule for s in verdict.skipped) == sorted(expect.get("skipped", []))
    assert set(expect.get("read", [])) <= read, read
    assert not set(expect.get("not_read", [])) & read, read
    assert verdict.highest_tier is not None
    assert verdict.highest_tier.label == expect["highest_tier"]
    # every fact read is one this policy can read; presets it did not ask for are not listed
    assert read <= policy.fact_names | _dependencies(policy.fact_names)


def _dependencies(names: frozenset[str]) -> set[str]:
    registry = default_registry()
    out: set[str] = set()
    todo = list(names)
    while todo:
        for dep in registry[todo.pop()].depends:
            if dep not in out:
                out.add(dep)
                todo.append(dep)
    return out

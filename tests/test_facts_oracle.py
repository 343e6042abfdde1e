"""Oracle facts (lab-only): read from list files, missing when a list is not supplied."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.errors import ConfigError, FactError
from relay.facts import oracle
from relay.facts.base import FactRegistry, Facts, Services
from relay.facts.oracle import sender_keys
from relay.facts.oraclelists import OracleLists
from relay.message import Message
from tests.support.golden_facts import GOLDEN, Case, check_case, covered, family_cases

REGISTRY = FactRegistry(oracle.FACTS)


@pytest.fixture(scope="module")
def services() -> Services:
    return Services(oracle=OracleLists.load(GOLDEN / "oracle"))


@pytest.mark.parametrize("case", family_cases(oracle.FACTS), ids=lambda c: c.file)
async def test_golden(case: Case, services: Services) -> None:
    await check_case(case, oracle.FACTS, REGISTRY, services)


def test_every_oracle_fact_has_a_golden_case() -> None:
    assert covered(oracle.FACTS) == set()


def test_every_oracle_fact_is_marked_lab_only() -> None:
    assert all(spec.lab_only for spec in oracle.FACTS)


T0 = 1_795_000_000.0  # 2026-11-18 11:06:40 UTC


def _msg(sender: str, rcpt: list[str]) -> Message:
    return Message.from_file_bytes(f"From: {sender}\n\nx\n".encode(), received_at=T0, rcpt_to=rcpt)


async def test_absent_lists_make_facts_missing_not_false(tmp_path: Path) -> None:
    (tmp_path / "consent.tsv").write_text("a@x.example\tb@y.example\n")
    services = Services(oracle=OracleLists.load(tmp_path))
    facts = Facts(REGISTRY, _msg("b@y.example", ["a@x.example"]), services)
    assert await facts.get("consent_listed") is True
    for name in ("customer_listed", "recipient_is_person", "opted_out", "sender_complaint_rate"):
        with pytest.raises(FactError, match=r"no .* list supplied"):
            await facts.get(name)


async def test_no_oracle_service_is_missing() -> None:
    facts = Facts(REGISTRY, _msg("b@y.example", ["a@x.example"]), Services())
    with pytest.raises(FactError, match="service oracle is not configured"):
        await facts.get("consent_listed")


async def test_consent_needs_every_recipient(tmp_path: Path) -> None:
    (tmp_path / "consent.tsv").write_text("# comment\n\na@x.example\ty.example\n")
    services = Services(oracle=OracleLists.load(tmp_path))
    one = _msg("news@mail.y.example", ["A@x.example"])
    two = _msg("news@mail.y.example", ["a@x.example", "c@x.example"])
    assert await Facts(REGISTRY, one, services).get("consent_listed") is True
    assert await Facts(REGISTRY, two, services).get("consent_listed") is False


def test_sender_keys_walk_up_domains() -> None:
    msg = Message.from_file_bytes(
        b"From: N <n@a.b.example>\n\nx\n", received_at=T0, mail_from="bounce@c.example"
    )
    assert sender_keys(msg) == [
        "n@a.b.example", "a.b.example", "b.example", "bounce@c.example", "c.example",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [("persons.tsv", "a@x.example\trobot\n", "person or organisation"),
     ("optouts.tsv", "a@x.example\tb.example\t10/03/2026\n", "YYYY-MM-DD"),
     ("complaints.tsv", "b.example\t3%\n", "0..1"),
     ("consent.tsv", "only-one-column\n", "2 columns")],
)  # fmt: skip
def test_bad_lines_name_file_and_line(
    tmp_path: Path, name: str, content: str, problem: str
) -> None:
    (tmp_path / name).write_text("# header\n" + content)
    with pytest.raises(ConfigError, match=f"{name}: line 2: .*{problem}"):
        OracleLists.load(tmp_path)


def test_missing_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        OracleLists.load(tmp_path / "absent")

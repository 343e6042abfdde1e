"""The golden fact case loader (tests/support/golden_facts.py) checks all that is written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.golden_facts import CHECKED, GOLDEN, GoldenCaseError, cases

GOOD = '["a.eml"]\ntime = 2026-03-10T09:00:00Z\n["a.eml".expect]\nlist_id = ""\n'


def _load(tmp_path: Path, text: str) -> None:
    path = tmp_path / "expected.toml"
    path.write_text(text)
    cases(path)


def test_a_well_formed_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "expected.toml"
    path.write_text(GOOD)
    [case] = cases(path)
    assert (case.file, case.expect) == ("a.eml", {"list_id": ""})


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (GOOD + 'opted_out = true\n["b.eml"]\ntime = 2026-03-10T09:00:00Z\nexpcet = {}\n',
         r"\['b.eml'\]: unknown key 'expcet'"),
        (GOOD.replace("time =", "envelope = { rcpt = [] }\ntime ="),
         r"\['a.eml'\]: unknown key 'envelope.rcpt'"),
        (GOOD + "no_such_fact = 1\n", r"\['a.eml'\]: expect: unknown fact 'no_such_fact'"),
        (GOOD.replace("time =", 'missing = ["nope"]\ntime ='),
         r"\['a.eml'\]: missing: unknown fact 'nope'"),
        (GOOD + '["a.eml".preset]\nnope = 1\n', r"\['a.eml'\]: preset: unknown fact 'nope'"),
        (GOOD + 'dkim_result = "pass"\n',  # registered, but no family test would check it
         r"\['a.eml'\]: expect: no golden test checks fact 'dkim_result'"),
        (GOOD.replace("time = 2026-03-10T09:00:00Z\n", ""), r"\['a.eml'\]: 'time' is missing"),
        (GOOD.replace("09:00:00Z", "09:00:00"), r"\['a.eml'\]: 'time' needs an offset"),
        (GOOD.replace("2026-03-10T09:00:00Z", "1773133200.0"),
         r"\['a.eml'\]: 'time' must be a datetime"),
    ],
)  # fmt: skip
def test_anything_the_loader_cannot_check_names_file_and_case(
    tmp_path: Path, text: str, problem: str
) -> None:
    with pytest.raises(GoldenCaseError, match=re.escape(str(tmp_path / "expected.toml"))) as err:
        _load(tmp_path, text)
    assert re.search(problem, str(err.value)), str(err.value)


def test_the_shipped_cases_load() -> None:
    assert {c.file for c in cases()} == {p.name for p in GOLDEN.glob("*.eml")}


@pytest.mark.parametrize("family", sorted(CHECKED))
def test_each_checked_family_has_a_module_that_runs_its_cases(family: str) -> None:
    source = (Path(__file__).parent / f"test_facts_{family}.py").read_text()
    assert f"family_cases({family}.FACTS)" in source
    assert f"check_case(case, {family}.FACTS," in source

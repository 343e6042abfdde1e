"""docs/facts.md documents every registered fact."""

from __future__ import annotations

from pathlib import Path

from relay.facts import default_registry

DOC = Path(__file__).resolve().parents[1] / "docs" / "facts.md"


def test_every_registered_fact_is_documented() -> None:
    text = DOC.read_text(encoding="utf-8")
    undocumented = [name for name in default_registry().names() if f"`{name}`" not in text]
    assert undocumented == []

"""The experimenter's address-keyed lists behind the lab-only oracle facts (facts/oracle.py).

Loaded once by the lab (``OracleLists.load``) and handed to the facts as the ``oracle``
service; kept apart from the facts so ``Services`` can name the type without a cycle.
"""

from __future__ import annotations

import csv
import datetime as dt
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from relay.errors import ConfigError

Pairs = frozenset[tuple[str, str]]


def _rows(path: Path, width: int) -> Iterator[tuple[int, list[str]]]:
    with path.open(encoding="utf-8", newline="") as fh:
        for number, row in enumerate(csv.reader(fh, delimiter="\t"), start=1):
            cells = [c.strip() for c in row]
            if not cells or not cells[0] or cells[0].startswith("#"):
                continue
            if len(cells) < width or any(not c for c in cells[:width]):
                raise ConfigError(str(path), f"line {number}", f"expected {width} columns")
            yield number, [c.lower() for c in cells[:width]]


def _pairs(path: Path) -> Pairs:
    return frozenset((r, s) for _, (r, s) in _rows(path, 2))


def _persons(path: Path) -> Mapping[str, bool]:
    out: dict[str, bool] = {}
    for number, (address, kind) in _rows(path, 2):
        if kind not in ("person", "organisation", "organization"):
            raise ConfigError(str(path), f"line {number}", "kind must be person or organisation")
        out[address] = kind == "person"
    return out


def _optouts(path: Path) -> Mapping[tuple[str, str], dt.date]:
    out: dict[tuple[str, str], dt.date] = {}
    for number, (rcpt, sender, day) in _rows(path, 3):
        try:
            date = dt.date.fromisoformat(day)
        except ValueError:
            raise ConfigError(str(path), f"line {number}", "date must be YYYY-MM-DD") from None
        key = (rcpt, sender)
        out[key] = min(date, out.get(key, date))  # the first opt-out is the one that counts
    return out


def _rates(path: Path) -> Mapping[str, float]:
    out: dict[str, float] = {}
    for number, (sender, rate) in _rows(path, 2):
        try:
            value = float(rate)
        except ValueError:
            value = -1.0
        if not 0.0 <= value <= 1.0:
            raise ConfigError(str(path), f"line {number}", "rate must be a number in 0..1")
        out[sender] = value
    return out


@dataclass(frozen=True)
class OracleLists:
    """The lists of one experiment; ``None`` for a list that was not supplied."""

    consent: Pairs | None = None
    customers: Pairs | None = None
    persons: Mapping[str, bool] | None = None
    optouts: Mapping[tuple[str, str], dt.date] | None = None
    complaints: Mapping[str, float] | None = None
    source: str = field(default="")

    @classmethod
    def load(cls, directory: Path) -> OracleLists:
        """Read whichever list files exist in ``directory``; ConfigError on a bad line."""
        if not directory.is_dir():
            raise ConfigError(str(directory), "", "oracle list directory not found")

        def opt(name: str) -> Path | None:
            path = directory / name
            return path if path.is_file() else None

        consent, customers = opt("consent.tsv"), opt("customers.tsv")
        persons, optouts, complaints = opt("persons.tsv"), opt("optouts.tsv"), opt("complaints.tsv")
        return cls(
            consent=_pairs(consent) if consent else None,
            customers=_pairs(customers) if customers else None,
            persons=_persons(persons) if persons else None,
            optouts=_optouts(optouts) if optouts else None,
            complaints=_rates(complaints) if complaints else None,
            source=str(directory),
        )

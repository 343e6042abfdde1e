"""Line numbers for a TOML document, which tomllib does not report.

The text is scanned once for table headers (``[policy]``, ``[[rule]]``, ``[override.x]``)
and ``key =`` lines; the n-th ``[[rule]]`` header is the n-th rule table tomllib returns.
Multi-line strings are skipped so a condition spanning lines cannot fake a header.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"""^\s*("[^"]*"|'[^']*'|[A-Za-z0-9_-]+)\s*[.=]""")
_TRIPLE = re.compile(r'"""|\'\'\'')

Path = tuple[str | int, ...]


@dataclass
class _Table:
    line: int
    keys: dict[str, int] = field(default_factory=dict)


class LineIndex:
    """Where each table and key of a TOML text starts (1-based line numbers)."""

    def __init__(self, text: str) -> None:
        self._tables: dict[Path, _Table] = {(): _Table(1)}
        counts: dict[str, int] = {}
        current: Path = ()
        in_multiline: str | None = None
        for number, line in enumerate(text.splitlines(), start=1):
            if in_multiline is not None:
                if line.count(in_multiline) % 2 == 1:
                    in_multiline = None
                continue
            header = _HEADER.match(line)
            if header:
                current = self._open(header.group(1) == "[[", header.group(2), counts, number)
                continue
            key = _KEY.match(line)
            if key:
                name = key.group(1).strip("\"'")
                self._tables[current].keys.setdefault(name, number)
            triples = _TRIPLE.findall(line)
            if len(triples) % 2 == 1:
                in_multiline = triples[-1]

    def _open(self, array: bool, dotted: str, counts: dict[str, int], line: int) -> Path:
        parts = [p.strip().strip("\"'") for p in dotted.split(".")]
        path: list[str | int] = []
        for i, part in enumerate(parts):
            path.append(part)
            prefix = ".".join(parts[: i + 1])
            last = i == len(parts) - 1
            if last and array:
                counts[prefix] = counts.get(prefix, 0) + 1
                path.append(counts[prefix] - 1)
            elif prefix in counts:
                path.append(counts[prefix] - 1)
        key = tuple(path)
        self._tables.setdefault(key, _Table(line))
        return key

    def table(self, *path: str | int) -> int:
        """Line of a table's header; falls back to its parent's, then to line 1."""
        while path:
            found = self._tables.get(path)
            if found is not None:
                return found.line
            path = path[:-1]
        return 1

    def key(self, *path: str | int) -> int:
        """Line of ``key`` (the last element) in the table ``path[:-1]``."""
        table = self._tables.get(path[:-1])
        if table is not None and path and str(path[-1]) in table.keys:
            return table.keys[str(path[-1])]
        return self.table(*path[:-1])

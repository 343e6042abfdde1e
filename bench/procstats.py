"""CPU and memory of a process tree, read from /proc (Linux), without psutil.

The relay may run several worker processes (and classifier pool processes) under one
parent, so every figure is summed over the parent and all its descendants.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (which may contain spaces)."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def descendants(root: int) -> list[int]:
    """root and every process below it (scans /proc once)."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is None:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time consumed so far by these processes."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / CLOCK_TICKS


def rss_bytes(pids: list[int]) -> int:
    """Resident set size summed over the processes (VmRSS from /proc/<pid>/status)."""
    total = 0
    for pid in pids:
        try:
            lines = (PROC / str(pid) / "status").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
                break
    return total


def listening_pids(pids: list[int], port: int) -> list[int]:
    """Those of pids holding a TCP socket that listens on port (the SMTP workers)."""
    inodes: set[str] = set()
    for table in ("tcp", "tcp6"):
        try:
            rows = (PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(cols[9])
    found = []
    for pid in pids:
        try:
            fds = list((PROC / str(pid) / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = str(fd.readlink())
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                found.append(pid)
                break
    return found


@dataclass(frozen=True, slots=True)
class MachineCpu:
    """Busy and total jiffies of the whole machine, from /proc/stat."""

    busy: int
    total: int

    @classmethod
    def read(cls) -> MachineCpu:
        cols = [int(v) for v in (PROC / "stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = cols[3] + (cols[4] if len(cols) > 4 else 0)  # idle + iowait
        return cls(busy=sum(cols) - idle, total=sum(cols))

    def utilisation_since(self, earlier: MachineCpu) -> float:
        """Fraction of all cores busy between the two readings (1.0 = every core busy)."""
        total = self.total - earlier.total
        return (self.busy - earlier.busy) / total if total else 0.0


def load_average() -> tuple[float, float, float]:
    one, five, fifteen = os.getloadavg()
    return one, five, fifteen


def pss_bytes(pids: list[int]) -> int:
    """Proportional set size summed over the processes (``Pss:`` of /proc/<pid>/smaps_rollup).

    RSS counts a page shared by N processes N times (the model's pages, the interpreter,
    libraries after fork or spawn); PSS charges each process 1/N of it, so the sum over a
    tree is what the tree really costs in memory. Reading smaps_rollup walks the page
    tables, so it is sampled less often than RSS. A process that vanished, or one we may not
    read, counts 0.
    """
    total = 0
    for pid in pids:
        try:
            text = (PROC / str(pid) / "smaps_rollup").read_text()
        except OSError:
            continue
        total += parse_pss_kib(text) * 1024
    return total


def parse_pss_kib(smaps_rollup: str) -> int:
    """The ``Pss:`` figure (kB) of one smaps_rollup text; 0 when absent."""
    for line in smaps_rollup.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def cpu_by_pid(pids: list[int]) -> dict[int, float]:
    """User + system CPU seconds of each process (those that vanished are left out)."""
    out: dict[int, float] = {}
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            out[pid] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return out


def parent_pid(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields is not None else None


def cmdline(pid: int) -> str:
    """The process's command line, arguments joined by spaces ("" once it is gone)."""
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()

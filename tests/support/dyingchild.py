"""A pipes child that dies before saying it is ready (a broken install, a model that will
not load): it appends a line to the file named by its second argument, then exits 1."""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    with Path(sys.argv[2]).open("a", encoding="ascii") as starts:
        starts.write("started\n")
    sys.exit(1)

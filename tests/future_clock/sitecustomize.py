"""Loaded by every Python process of `make unit-future` (this directory is on PYTHONPATH).

libfaketime 0.9.10 (Debian bookworm) cannot run Python 3.11 with either monotonic setting.
Faked, CLOCK_MONOTONIC moves into the wall-clock domain and timed waits on locks (Python
uses sem_clockwait, which libfaketime does not intercept) sleep for years. Real, as the
target runs it (FAKETIME_DONT_FAKE_MONOTONIC=1), the absolute monotonic clock_nanosleep
behind time.sleep fails with EINVAL (wolfcw/libfaketime#426). So here time.sleep waits in
select(), whose relative timeout libfaketime passes through untouched.
"""

from __future__ import annotations

import os
import select
import time
from typing import SupportsIndex


def _sleep(seconds: float | SupportsIndex) -> None:
    length = float(seconds)
    if length < 0:
        raise ValueError("sleep length must be non-negative")
    select.select([], [], [], length)  # resumed with the time left after a signal (PEP 475)


if os.environ.get("FAKETIME_DONT_FAKE_MONOTONIC") == "1":
    time.sleep = _sleep

"""Process hygiene for the pools the relay starts (classifier, DKIM crypto): they die
with their parent and give back the memory a large request took."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> None:
    """Call first thing in a pool or pipe child: have the kernel send ``sig`` to this
    process when its parent dies.

    Without it, a relay worker killed during start-up (or by SIGKILL) leaves its classifier
    processes running, each holding a model in memory. Linux only; elsewhere a no-op.
    """
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)


def release_free_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc ``malloc_trim``).

    After a large request, glibc keeps what it freed (its mmap threshold has grown past the
    message's size), so a verification child that once held a 25 MB message kept ~100 MB
    for good. Elsewhere than glibc a no-op: the memory is only reused."""
    if sys.platform != "linux":
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        return

"""The supervisor of several workers stays lean: it never loads what only workers use
(facts, policy's CEL engine, the HTML parser) or their children (numpy), which it once did
for ~55 MiB; and the workers leave numpy to their children (issue 17)."""

from __future__ import annotations

import signal
from pathlib import Path

from tests.support.relay import free_port
from tests.test_lifecycle import start_serve, wait_for, worker_pids, write_config

# Shared objects the supervisor must not load: the CEL engine (the policy) and selectolax's
# HTML parser (facts), which the workers load, and numpy's core, which only the workers'
# analysis children load.
NUMPY = "_multiarray_umath"
WORKER_LIBS = ("/cel/", "/selectolax/")
HEAVY = (NUMPY, *WORKER_LIBS)


def _mapped(pid: int) -> set[str]:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {name for name in HEAVY if name in maps}


async def test_the_supervisor_maps_none_of_the_workers_libraries(tmp_path: Path) -> None:
    port = free_port()
    cfg = write_config(tmp_path, port, workers=2)
    log_path = tmp_path / "relay.log"
    proc = start_serve(cfg, log_path)
    try:
        await wait_for(lambda: log_path.read_text().count("ready (pid") == 2)
        workers = worker_pids(proc.pid)
        assert len(workers) == 2
        # The check sees these libraries where they are loaded...
        assert all(_mapped(pid) == set(WORKER_LIBS) for pid in workers)
        # (numpy's core shows in an analysis child's maps: tests/test_hang_overload.py.)
        # ... and the supervisor has none of them.
        assert _mapped(proc.pid) == set()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

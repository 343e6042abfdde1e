"""bench/stages.py: a worker's entry point is plumbing, never a stage of its own."""

from __future__ import annotations

import pytest
from bench import stages

# How a worker's stacks begin under the supervisor: ``python -m relay.launch`` (runpy),
# its main and worker_entry, the app's worker_main, asyncio.run.
ENTRY = [
    "_run_module_as_main (<frozen runpy>:198)",
    "_run_code (<frozen runpy>:88)",
    "<module> (relay/launch.py:139)",
    "main (relay/launch.py:78)",
    "worker_entry (relay/launch.py:63)",
    "worker_main (relay/app.py:408)",
    "run (asyncio/runners.py:190)",
    "run_forever (asyncio/base_events.py:607)",
    "_run_once (asyncio/base_events.py:1884)",
]


@pytest.mark.parametrize(
    ("stage", "leaf"),
    [
        ("event loop", ["select (selectors.py:468)"]),
        (
            "receive",
            ["_run (asyncio/events.py:80)", "_handle_client (aiosmtpd/smtp.py:3)"],
        ),
        (
            "auth",  # the pipes' own write callback: plumbing with its default stage
            [
                "_run (asyncio/events.py:80)",
                "_Child._flush (relay/proc/pipes.py:142)",
                "write (asyncio/unix_events.py:695)",
            ],
        ),
    ],
)
def test_samples_under_the_worker_entry_go_to_their_own_stage(stage: str, leaf: list[str]) -> None:
    # These went to "other" while relay/launch.py counted as a stage: 0.83 ms a message
    # of the everything-on run (bench/results/throughput-everything-on.md).
    assert stages.stage_of_stack([*ENTRY, *leaf]) == stage

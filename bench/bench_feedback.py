"""In-process cost of one `relay learn` (entry from bytes + SQLite write), after start-up.

    .venv/bin/python -m bench.bench_feedback [N]

Target (issue 16): one learn answers in under 50 ms. Python start-up and imports are
excluded here; they are printed separately.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path


async def _run(n: int) -> None:
    started = time.perf_counter()
    from relay.config import FeedbackSettings
    from relay.feedback.learn import Learner
    from relay.feedback.store import SqliteFeedback
    from relay.secretkey import SecretKey

    learner_maker_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        store = await SqliteFeedback(
            Path(tmp) / "state.sqlite3",
            key=SecretKey.generate(),
            settings=FeedbackSettings(per_reporter_daily=10 * n),
        ).open()
        learner = Learner(store)
        ready = time.perf_counter()
        times = []
        for i in range(n):
            raw = (
                f"From: Shop <offers@shop{i}.example>\r\nSubject: deal {i}\r\n\r\n"
                f"Buy now, offer {i}, at http://www.pills{i}.example/x\r\n" + "text " * 400
            ).encode()
            t0 = time.perf_counter()
            await learner.learn(raw, action="spam", reporter="bench", source="cli", now=1e9 + i)
            times.append(time.perf_counter() - t0)
        await store.close()
    print(f"imports: {(learner_maker_start - started) * 1e3:.0f} ms")
    print(f"open store + entry maker: {(ready - learner_maker_start) * 1e3:.0f} ms")
    times.sort()
    print(
        f"one learn ({n} runs): median {statistics.median(times) * 1e3:.2f} ms, "
        f"p95 {times[int(0.95 * (n - 1))] * 1e3:.2f} ms, max {times[-1] * 1e3:.2f} ms"
    )


if __name__ == "__main__":
    asyncio.run(_run(int(sys.argv[1]) if len(sys.argv) > 1 else 200))

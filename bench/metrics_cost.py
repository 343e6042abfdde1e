"""What observing one message costs: ``Metrics.message_done`` plus the SMTP events of one
session, with in-memory values (one process) and with memory-mapped files (several
workers), against the no-op observer. Writes bench/results/metrics_cost.json.

    python -m bench.metrics_cost

The per-message figure is set against the relay's per-message budget: one loop at about
740 msgs/s (docs/benchmarks.md) spends 1.35 ms per message.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BUDGET_SECONDS = 1 / 740  # one event loop's per-message time doing SMTP in and out only
ROUNDS = 20000

# Runs in a fresh interpreter so the multiprocess variant can set the variable before
# prometheus_client is imported (see relay.ops.multiprocess).
WORKER = """
import json, sys, time
from prometheus_client import CollectorRegistry
from relay.ops.metrics import Metrics
from relay.contracts import MessageReport, NullObserver, Outcome
from relay.reply import Reply
from relay.verdict import Action, FactRead, RuleHit, Tier, Verdict

verdict = Verdict(
    action=Action.TAG, score=6.0, policy="default",
    hits=(RuleHit("spf_softfail", 1.0), RuleHit("unauthenticated", 2.0),
          RuleHit("classifier_spam_possible", 5.0)),
    facts=(FactRead("client_ip", Tier.CONNECTION, "192.0.2.1"),
           FactRead("spf", Tier.ENVELOPE, "softfail"),
           FactRead("dkim_result", Tier.ENVELOPE, "none"),
           FactRead("dmarc", Tier.ENVELOPE, "none"),
           FactRead("dmarc_policy", Tier.ENVELOPE, None),
           FactRead("arc", Tier.ENVELOPE, "none"),
           FactRead("spam_probability", Tier.CONTENT, 0.8)),
    highest_tier=Tier.CONTENT,
)
report = MessageReport(
    queue_id="Q", size=4000, recipients=1, verdict=verdict,
    reply=Reply(250, "2.0.0", "ok"), outcome=Outcome.DELIVERED,
    timings=(("decide", 0.002), ("stamp", 0.0001), ("act", 0.003), ("total", 0.006)),
    delivery="ok",
)
observer = NullObserver() if sys.argv[2] == "null" else Metrics(CollectorRegistry())
rounds = int(sys.argv[1])

def session():
    observer.connection_opened()
    for code in (220, 250, 250, 250, 354):  # greeting, EHLO, MAIL, RCPT, DATA
        observer.smtp_reply(code)
    observer.message_done(report)
    observer.smtp_reply(250)
    observer.smtp_reply(221)
    observer.connection_closed()

for _ in range(1000):
    session()
start = time.perf_counter()
for _ in range(rounds):
    session()
if hasattr(observer, "flush"):  # counters are batched; the app flushes every second
    observer.flush()
print(json.dumps({"seconds_per_message": (time.perf_counter() - start) / rounds}))
"""


def measure(kind: str, multiproc_dir: str | None) -> float:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src")
    if multiproc_dir is not None:
        env["PROMETHEUS_MULTIPROC_DIR"] = multiproc_dir
    out = subprocess.run(
        [sys.executable, "-c", WORKER, str(ROUNDS), kind],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    return float(json.loads(out)["seconds_per_message"])


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            "null": measure("null", None),
            "single_process": measure("metrics", None),
            "multiprocess": measure("metrics", tmp),
        }
    doc = {
        "what": "observer calls of one SMTP session with one message (7 facts, 3 rules)",
        "rounds": ROUNDS,
        "python": sys.version.split()[0],
        "microseconds_per_message": {k: round(v * 1e6, 2) for k, v in results.items()},
        "load_average_1m": round(os.getloadavg()[0], 2),  # other jobs slow every figure
        "share_of_one_loop_budget": {
            k: round((v - results["null"]) / BUDGET_SECONDS, 4)
            for k, v in results.items()
            if k != "null"
        },
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "metrics_cost.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()

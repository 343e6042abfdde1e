"""A shadow log written by a live relay: the enforced policy accepts everything and
article 7 runs in shadow, over SMTP on loopback into a real sink (tests/test_lab_shadow.py
reports on it, tests/test_lab_diff.py compares its two policies)."""

from __future__ import annotations

from pathlib import Path

import aiosmtplib

from tests.support.dnsserver import LocalDns
from tests.support.relay import make_settings, running_relay, sink_server

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "fixtures" / "lab" / "golden"


async def live_shadow_log(tmp_path: Path) -> tuple[Path, int]:
    """The shadow log (``tmp_path/shadow.jsonl``) after two messages, an advertisement to
    60 recipients and a personal one, and how many messages the sink received."""
    shadow_log = tmp_path / "shadow.jsonl"
    bulk = [f"user{i}@example.org" for i in range(60)]
    with LocalDns({}) as dns:
        async with sink_server() as sink:
            settings = make_settings(
                tmp_path,
                {
                    "delivery": {"mode": "smtp", "downstream": sink.address},
                    "dns": {"nameservers": [dns.address], "timeout": 1},
                    "policy": {
                        "path": "",
                        "shadow": [str(REPO / "config" / "regimes" / "itr_article7.toml")],
                        "shadow_log": str(shadow_log),
                    },
                },
            )
            async with running_relay(settings) as relay:
                for eml, rcpts in (("ad.eml", bulk), ("personal.eml", ["bob@example.org"])):
                    await aiosmtplib.send(
                        (GOLDEN / eml).read_bytes(),
                        sender="sender@shop.example",
                        recipients=rcpts,
                        hostname="127.0.0.1",
                        port=relay.port,
                        timeout=10,
                    )
            return shadow_log, len(sink.messages)

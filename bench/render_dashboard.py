"""Draws the dashboard's main panels from a real run into docs/dashboard.png.

Everything is real and on loopback: ``relay serve`` with two workers (so the picture also
shows the supervisor's aggregated endpoint), a DNS server holding SPF, DMARC and DKIM
records, a downstream aiosmtpd sink, and a Prometheus scraping the relay every second.
SpamAssassin messages (the shared corpus; synthetic text when it is absent) are sent
through the default policy, DKIM-signed by their sender domains, in five phases:

1. normal mail;            2. a spam wave, half of it spoofing a DMARC p=reject domain;
3. a DNS outage (SPF, DKIM and DMARC lookups time out);
4. a downstream that answers 451;
5. a broken policy file pushed with SIGHUP, then fixed.

Then the panels' queries go through Prometheus's query_range API and matplotlib draws
one panel per operator question, with the phases shaded.

    python -m bench.render_dashboard [--model models/spam.skops] [--phase-seconds 40]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosmtplib
import dkim
import matplotlib
import matplotlib.patches
import nacl.signing
from tests.support.dnsserver import LocalDns
from tests.support.prometheus import Prometheus, running_prometheus
from tests.support.relay import Sink, sink_server

from bench.net import free_port
from bench.servers import TomlValue, toml_text

matplotlib.use("Agg")
import matplotlib.pyplot as plt

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RELAY_SHARED", REPO.parent / "shared"))
SELECTOR = "s1"
GOOD = ("news.example", "shop.example", "friends.example")  # SPF pass, DKIM signed
SPOOFED = "bank.example"  # DMARC p=reject; the spam wave forges it without its key
TTL = 1  # short, so the relay's DNS cache does not hide the outage


@dataclass(frozen=True)
class Phase:
    name: str
    spam_share: float
    spoof_share: float = 0.0


PHASES = (
    Phase("normal", 0.2),
    Phase("spam wave", 0.75, spoof_share=0.5),
    Phase("DNS outage", 0.2),
    Phase("downstream 451", 0.2),
    Phase("bad policy reload", 0.2),
)


# --- mail --------------------------------------------------------------------------------


def load_corpus(scratch: Path, per_label: int) -> dict[str, list[bytes]]:
    """Ham and spam bodies from the SpamAssassin tarballs, or synthetic ones."""
    corpus = SHARED / "corpora" / "spamassassin"
    sources = {"ham": "20030228_easy_ham.tar.bz2", "spam": "20030228_spam.tar.bz2"}
    out: dict[str, list[bytes]] = {"ham": [], "spam": []}
    if not all((corpus / f).exists() for f in sources.values()):
        print(f"corpus not found under {corpus}: using synthetic messages", file=sys.stderr)
        out["ham"] = [f"Hi,\n\nminutes of meeting {i} attached.\n".encode() for i in range(50)]
        out["spam"] = [b"BUY NOW!!! cheap meds, click http://x.test/ to WIN $$$\n"] * 50
        return out
    for label, name in sources.items():
        with tarfile.open(corpus / name) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and not m.name.endswith("cmds")]
            for member in random.Random(7).sample(members, min(per_label, len(members))):
                fh = tar.extractfile(member)
                if fh is not None:
                    out[label].append(fh.read())
    return out


def _split(raw: bytes) -> tuple[list[bytes], bytes]:
    raw = re.sub(rb"\r?\n", b"\r\n", raw)
    head, sep, body = raw.partition(b"\r\n\r\n")
    lines: list[bytes] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and lines:
            lines[-1] += b"\r\n" + line
        elif line:
            lines.append(line)
    return lines, body if sep else b""


KEEP = re.compile(rb"^(subject|content-type|content-transfer-encoding|mime-version):", re.I)


def make_message(raw: bytes, domain: str, key: bytes | None, n: int) -> bytes:
    """The corpus message under a new From/Date/Message-ID, DKIM-signed when ``key``."""
    lines, body = _split(raw)
    kept = [line for line in lines if KEEP.match(line)]
    head = [
        f"From: Sender <sender{n % 7}@{domain}>".encode(),
        b"To: Bob <bob@example.org>",
        time.strftime("Date: %a, %d %b %Y %H:%M:%S +0000", time.gmtime()).encode(),
        f"Message-ID: <{n}.{time.time_ns()}@{domain}>".encode(),
        *kept,
    ]
    message = b"\r\n".join(head) + b"\r\n\r\n" + body
    if key is not None:
        signature = dkim.sign(
            message,
            SELECTOR.encode(),
            domain.encode(),
            key,
            signature_algorithm=b"ed25519-sha256",
            include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
        )
        message = signature + message
    return message


def dns_zone(keys: dict[str, bytes]) -> dict[str, list[tuple[str, str, int]]]:
    zone: dict[str, list[tuple[str, str, int]]] = {}
    for domain in GOOD:
        zone[f"{domain}."] = [("TXT", "v=spf1 ip4:127.0.0.0/8 -all", TTL)]
        zone[f"_dmarc.{domain}."] = [("TXT", "v=DMARC1; p=reject", TTL)]
    # the spoofed bank sends only from its own network: mail from here fails SPF and DMARC
    zone[f"{SPOOFED}."] = [("TXT", "v=spf1 ip4:192.0.2.0/24 -all", TTL)]
    zone[f"_dmarc.{SPOOFED}."] = [("TXT", "v=DMARC1; p=reject", TTL)]
    for domain, public in keys.items():
        record = f"v=DKIM1; k=ed25519; p={base64.b64encode(public).decode()}"
        zone[f"{SELECTOR}._domainkey.{domain}."] = [("TXT", record, TTL)]
    return zone


# --- the relay under test -----------------------------------------------------------------


@dataclass
class RelayProcess:
    proc: asyncio.subprocess.Process
    smtp_port: int
    metrics_port: int
    workdir: Path

    def ready(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.metrics_port}/readyz"
            with urllib.request.urlopen(url, timeout=2) as r:  # loopback only
                return bool(r.status == 200)
        except (OSError, urllib.error.HTTPError):
            return False


@contextlib.asynccontextmanager
async def relay_process(
    workdir: Path, dns: LocalDns, sink: Sink, model: Path | None
) -> AsyncIterator[RelayProcess]:
    smtp_port, metrics_port = free_port(), free_port()
    policy = workdir / "policy.toml"
    shutil.copy(REPO / "config" / "policy.toml", policy)
    config: dict[str, dict[str, TomlValue]] = {
        "smtp": {"listen": f"127.0.0.1:{smtp_port}", "hostname": "relay.test", "workers": 2},
        "relay": {"domains": ["example.org"]},
        "delivery": {"mode": "smtp", "downstream": sink.address, "timeout": 10},
        "dns": {"nameservers": [dns.address], "timeout": 1},
        "auth": {"enabled": True},
        "model": {"enabled": model is not None, "path": str(model or "none")},
        "policy": {"path": str(policy)},
        "metrics": {"enabled": True, "listen": f"127.0.0.1:{metrics_port}"},
        "state": {"path": str(workdir / "state.sqlite3")},
        "quarantine": {"path": str(workdir / "quarantine")},
        "security": {"key_file": str(workdir / "relay.key")},
        "log": {"level": "warning"},
    }
    (workdir / "relay.toml").write_text(toml_text(config))
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    with (workdir / "relay.log").open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "relay.cli", "serve", "--config", "relay.toml"),
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    relay = RelayProcess(proc, smtp_port, metrics_port, workdir)
    try:
        deadline = time.monotonic() + 900  # loading the model takes minutes on a busy machine
        while not await asyncio.to_thread(relay.ready):  # the sink runs on this loop
            if proc.returncode is not None or time.monotonic() > deadline:
                log_text = (workdir / "relay.log").read_text()
                raise RuntimeError(f"relay did not start (exit {proc.returncode}): {log_text}")
            await asyncio.sleep(0.3)
        yield relay
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()


# --- driving mail -------------------------------------------------------------------------


async def send_one(port: int, message: bytes, sender: str) -> None:
    with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
        await aiosmtplib.send(
            message,
            sender=sender,
            recipients=["bob@example.org"],
            hostname="127.0.0.1",
            port=port,
            timeout=30,
        )


async def drive(
    relay: RelayProcess,
    dns: LocalDns,
    sink: Sink,
    corpus: dict[str, list[bytes]],
    keys: dict[str, bytes],
    seconds: float,
) -> list[tuple[str, float, float]]:
    """Runs the phases; returns (name, start, end) in Unix time."""
    rng = random.Random(1)
    spans: list[tuple[str, float, float]] = []
    policy = relay.workdir / "policy.toml"
    good_policy = policy.read_text()
    counter = 0
    for phase in PHASES:
        start = time.time()
        if phase.name == "DNS outage":
            for domain in (*GOOD, SPOOFED):
                for name in (domain, f"_dmarc.{domain}", f"{SELECTOR}._domainkey.{domain}"):
                    dns.add_timeout(name)
        if phase.name == "downstream 451":
            sink.mode = "tempfail"
        if phase.name == "bad policy reload":
            policy.write_text(
                good_policy + '\n[[rule]]\nname = "broken"\nwhen = "no_such_fact > 1"\n'
            )
            relay.proc.send_signal(signal.SIGHUP)
        fixed = False
        while time.time() - start < seconds:
            if (
                phase.name == "bad policy reload"
                and not fixed
                and time.time() - start > seconds / 2
            ):
                policy.write_text(good_policy)
                relay.proc.send_signal(signal.SIGHUP)
                fixed = True
            batch = []
            for _ in range(4):
                counter += 1
                spam = rng.random() < phase.spam_share
                body = rng.choice(corpus["spam" if spam else "ham"])
                if spam and rng.random() < phase.spoof_share:
                    domain, key = SPOOFED, None  # forged: no valid signature
                else:
                    domain = rng.choice(GOOD)
                    key = keys[domain]
                message = make_message(body, domain, key, counter)
                batch.append(send_one(relay.smtp_port, message, f"bounce@{domain}"))
            await asyncio.gather(*batch)
            await asyncio.sleep(0.05)
        dns.timeout.clear()
        sink.mode = "accept"
        spans.append((phase.name, start, time.time()))
        print(f"phase {phase.name!r} done: {counter} messages so far", file=sys.stderr)
    await asyncio.sleep(3)  # two more scrapes after the last message
    return spans


# --- drawing ------------------------------------------------------------------------------

W = "[20s]"  # rate window: 20 scrapes at the 1 s interval of the run


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str
    right: bool = False  # drawn on the panel's second y axis, dashed


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[Query, ...]
    unit: str
    right_unit: str = ""
    style: str = "lines"  # lines | stack | log | step


PANELS = (
    Panel(
        "Is mail flowing? Messages/s by outcome",
        (Query(f"sum by (outcome) (rate(relay_message_outcomes_total{W}))", "{outcome}"),),
        "msgs/s",
        style="stack",
    ),
    Panel(
        "What is being rejected, and why? Top rules",
        (
            Query(f"topk(6, sum by (rule) (rate(relay_rule_hits_total{W})))", "{rule}"),
            Query(
                f'sum(rate(relay_message_outcomes_total{{outcome="rejected"}}{W}))',
                "rejected msgs/s",
                right=True,
            ),
        ),
        "rule hits/s",
        "rejected msgs/s",
    ),
    Panel(
        "Is authentication healthy? Temperror share",
        (
            Query(
                f'sum by (method) (rate(relay_auth_results_total{{result=~"temperror|error"}}{W}))'
                f" / sum by (method) (rate(relay_auth_results_total{W}))",
                "{method}",
            ),
        ),
        "share of checks",
    ),
    Panel(
        "Is the classifier drifting? Spam probability",
        (
            Query(
                f"sum(rate(relay_classifier_spam_probability_sum{W}))"
                f" / sum(rate(relay_classifier_spam_probability_count{W}))",
                "mean probability",
            ),
            Query(
                f'1 - sum(rate(relay_classifier_spam_probability_bucket{{le="0.9"}}{W}))'
                f" / sum(rate(relay_classifier_spam_probability_count{W}))",
                "share >= 0.9",
            ),
        ),
        "probability / share",
    ),
    Panel(
        "Is the downstream slow? p99 latency, delivery failures",
        (
            Query(
                "histogram_quantile(0.99, sum by (stage, le) "
                f"(rate(relay_stage_duration_seconds_bucket{W})))",
                "p99 {stage}",
            ),
            Query(
                "histogram_quantile(0.99, sum by (le) "
                f"(rate(relay_message_duration_seconds_bucket{W})))",
                "p99 end to end",
            ),
            Query(
                "sum by (result) (rate(relay_downstream_deliveries_total"
                f'{{result="temporary"}}{W}))',
                "downstream 4xx/s",
                right=True,
            ),
        ),
        "seconds",
        "failed deliveries/s",
        style="log",
    ),
    Panel(
        "Did a policy reload fail?",
        (
            Query("min(relay_policy_last_reload_success)", "last reload OK (1) / FAILED (0)"),
            Query(
                "sum by (result) (increase(relay_policy_reloads_total[5s]))",
                "reloads: {result}",
                right=True,
            ),
        ),
        "OK / FAILED",
        "reloads",
        style="step",
    ),
)
PHASE_COLORS = ("#eeeeee", "#fbd5d5", "#d5e3fb", "#fdebc4", "#d9f0d0")


def _label(template: str, metric: dict[str, str]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: metric.get(m.group(1), ""), template)


def _series(prom: Prometheus, q: Query, start: float, end: float) -> list[tuple[str, Any, Any]]:
    """(label, xs, ys) for each series with at least one non-zero, finite value."""
    out = []
    for series in prom.query_range(q.expr, start, end, 1):
        xs = [float(t) - start for t, _ in series["values"]]
        ys = [float(v) for _, v in series["values"]]
        if any(math.isfinite(y) and y != 0 for y in ys):
            out.append((_label(q.legend, series["metric"]), xs, ys))
    return out


def render(prom: Prometheus, spans: list[tuple[str, float, float]], out: Path) -> None:
    start, end = spans[0][1], spans[-1][2] + 2
    fig, axes = plt.subplots(2, 3, figsize=(18, 10), constrained_layout=True)
    for ax, panel in zip(axes.flat, PANELS, strict=True):
        for (_name, s, e), color in zip(spans, PHASE_COLORS, strict=True):
            ax.axvspan(s - start, e - start, color=color, zorder=0, linewidth=0)
        right = ax.twinx() if any(q.right for q in panel.queries) else None
        handles: list[Any] = []
        for q in panel.queries:
            target = right if q.right and right is not None else ax
            series = _series(prom, q, start, end)
            if panel.style == "stack" and series:
                handles += target.stackplot(
                    series[0][1], *[ys for _, _, ys in series], labels=[n for n, _, _ in series]
                )
                continue
            for label, xs, ys in series:
                kwargs: dict[str, Any] = {"label": label, "linewidth": 1.6}
                if q.right:
                    kwargs.update(linestyle="--", linewidth=1.3)
                if panel.style == "step":
                    handles += target.step(xs, ys, where="post", **kwargs)
                else:
                    handles += target.plot(xs, ys, **kwargs)
        if panel.style == "log":
            ax.set_yscale("log")
        if panel.style == "step":
            ax.set_ylim(-0.1, 1.3)
        if right is not None:
            right.set_ylabel(panel.right_unit)
            right.set_ylim(bottom=0)
        if not handles:
            ax.text(0.5, 0.5, "no data in this run", transform=ax.transAxes, ha="center")
        ax.set_title(panel.title, fontsize=12, loc="left")
        ax.set_xlabel("seconds into the run")
        ax.set_ylabel(panel.unit)
        ax.set_xlim(0, end - start)
        ax.grid(True, alpha=0.3)
        if handles:
            ax.legend(handles=handles, fontsize=8, loc="upper left", framealpha=0.9)
    patches = [
        matplotlib.patches.Patch(color=c, label=f"{i}. {name}")
        for i, ((name, _, _), c) in enumerate(zip(spans, PHASE_COLORS, strict=True), 1)
    ]
    fig.legend(handles=patches, loc="outside lower center", ncol=len(patches), fontsize=10)
    fig.suptitle(
        "relay: the dashboard's main panels from a real run "
        "(relay serve with 2 workers, Prometheus scraping every second)",
        fontsize=14,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    print(f"wrote {out}", file=sys.stderr)


async def run(args: argparse.Namespace) -> None:
    model: Path | None = args.model.resolve() if args.model.exists() else None
    if model is None:
        print(f"no model at {args.model}: running without the classifier", file=sys.stderr)
    signing = {d: nacl.signing.SigningKey.generate() for d in GOOD}
    keys = {d: base64.b64encode(bytes(k)) for d, k in signing.items()}
    public = {d: bytes(k.verify_key) for d, k in signing.items()}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        corpus = load_corpus(scratch, 300)
        with LocalDns(dns_zone(public)) as dns:
            async with sink_server() as sink:
                async with relay_process(scratch, dns, sink, model) as relay:
                    with running_prometheus(
                        scratch / "prometheus", [f"127.0.0.1:{relay.metrics_port}"]
                    ) as prom:
                        await asyncio.to_thread(prom.wait, prom.targets_up, 30, "target up")
                        spans = await drive(relay, dns, sink, corpus, keys, args.phase_seconds)
                        await asyncio.to_thread(render, prom, spans, args.out)
                        summary = {
                            "phases": [
                                {"name": n, "seconds": round(e - s, 1)} for n, s, e in spans
                            ],
                            "messages": prom.query("sum(relay_message_outcomes_total)")[0]["value"][
                                1
                            ],
                        }
                        print(json.dumps(summary), file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "spam.skops")
    parser.add_argument("--phase-seconds", type=float, default=40.0)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "dashboard.png")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()

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

import aiosmtplib
import dkim
import matplotlib
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
    for domain in (*GOOD, SPOOFED):
        zone[f"{domain}."] = [("TXT", "v=spf1 ip4:127.0.0.0/8 -all", TTL)]
        zone[f"_dmarc.{domain}."] = [("TXT", "v=DMARC1; p=reject", TTL)]
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
        deadline = time.monotonic() + 120
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

W = "[20s]"
PANELS: tuple[tuple[str, str, list[tuple[str, str]], str], ...] = (
    (
        "Is mail flowing? messages/s by outcome",
        "stack",
        [(f"sum by (outcome) (rate(relay_message_outcomes_total{W}))", "{outcome}")],
        "msgs/s",
    ),
    (
        "What is rejected, and why? top rules (hits/s)",
        "lines",
        [(f"topk(6, sum by (rule) (rate(relay_rule_hits_total{W})))", "{rule}")],
        "hits/s",
    ),
    (
        "Is authentication healthy? temperror share",
        "lines",
        [
            (
                f'sum by (method) (rate(relay_auth_results_total{{result=~"temperror|error"}}{W}))'
                f" / sum by (method) (rate(relay_auth_results_total{W}))",
                "{method}",
            )
        ],
        "share of checks",
    ),
    (
        "Is the classifier drifting? spam probability",
        "lines",
        [
            (
                f"sum(rate(relay_classifier_spam_probability_sum{W}))"
                f" / sum(rate(relay_classifier_spam_probability_count{W}))",
                "mean probability",
            ),
            (
                f'1 - sum(rate(relay_classifier_spam_probability_bucket{{le="0.9"}}{W}))'
                f" / sum(rate(relay_classifier_spam_probability_count{W}))",
                "share >= 0.9",
            ),
        ],
        "probability / share",
    ),
    (
        "Is the downstream slow? p99 latency by stage",
        "log",
        [
            (
                "histogram_quantile(0.99, sum by (stage, le) "
                f"(rate(relay_stage_duration_seconds_bucket{W})))",
                "p99 {stage}",
            ),
            (
                "histogram_quantile(0.99, sum by (le) "
                f"(rate(relay_message_duration_seconds_bucket{W})))",
                "p99 end to end",
            ),
        ],
        "seconds",
    ),
    (
        "Did a policy reload fail? last reload OK (1) / FAILED (0)",
        "step",
        [
            ("min(relay_policy_last_reload_success)", "last reload OK"),
            (
                f'sum(rate(relay_downstream_deliveries_total{{result="temporary"}}{W})) > 0',
                "downstream 451/s",
            ),
        ],
        "",
    ),
)


def _label(template: str, metric: dict[str, str]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: metric.get(m.group(1), ""), template)


def render(prom: Prometheus, spans: list[tuple[str, float, float]], out: Path) -> None:
    start, end = spans[0][1], spans[-1][2] + 2
    t0 = start
    fig, axes = plt.subplots(2, 3, figsize=(18, 9.5), constrained_layout=True)
    colors = ["#f2f2f2", "#fde2e2", "#e2ecfd", "#fff3d6", "#e8f6e3"]
    for ax, (title, kind, queries, unit) in zip(axes.flat, PANELS, strict=True):
        for (_name, s, e), color in zip(spans, colors, strict=True):
            ax.axvspan(s - t0, e - t0, color=color, zorder=0)
        stacked: list[tuple[list[float], list[float], str]] = []
        for expr, legend in queries:
            for series in prom.query_range(expr, start, end, 2):
                xs = [float(t) - t0 for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                label = _label(legend, series["metric"])
                if kind == "stack":
                    stacked.append((xs, ys, label))
                elif kind == "step":
                    ax.step(xs, ys, where="post", label=label, linewidth=1.8)
                else:
                    ax.plot(xs, ys, label=label, linewidth=1.5)
        if stacked:
            xs = stacked[0][0]
            same = [s for s in stacked if len(s[0]) == len(xs)]
            ax.stackplot(xs, *[s[1] for s in same], labels=[s[2] for s in same], alpha=0.85)
        if kind == "log":
            ax.set_yscale("log")
        ax.set_title(title, fontsize=11, loc="left")
        ax.set_xlabel("seconds into the run")
        ax.set_ylabel(unit)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", framealpha=0.85)
    for name, s, e in spans:
        axes[0][0].annotate(
            name,
            xy=((s + e) / 2 - t0, 1.0),
            xycoords=("data", "axes fraction"),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    fig.suptitle(
        "relay dashboard, main panels: real run (2 workers, Prometheus 1 s scrape), "
        "phases shaded: " + ", ".join(name for name, _, _ in spans),
        fontsize=12,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
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

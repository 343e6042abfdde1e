"""CPU per message of the analysis child (``relay.analysis``), two source trees side by side.

Issue 17 counts CPU per message over the whole process tree; the analysis child's part is
its request handling: classify (``C``) and verify (``V``) requests of every message. This
runs the child's real handler (``Analysis.handle``, what ``pipes.serve`` calls for each
frame) in-process over the same requests for a base tree and a new tree, each in its own
interpreter that imports ``relay`` from the tree given (``--base DIR``, ``--src DIR``),
interleaved (base, new, base, new, ...), and reports the median of the rounds, per kind of
message:

- ``bench``: the throughput benchmark's message (bench/mail.py: 4136 bytes, DKIM-signed
  with RSA-2048; its key sent with the request, as the relay worker does), again and again
  as in bench.run;
- ``sa-median``: the SpamAssassin messages nearest the corpus's median size (no
  signature: the worker still sends a ``V`` request, with no keys);
- ``fingerprint``: one ``F`` request (the ``bulk_count`` fact's MinHash) a message, of the
  bench message's and the sa-median messages' extracted text; a relay sends these only
  when a policy reads a bulk fact (the default policy does not).

CPU is ``time.process_time`` of the handling loop alone (model loading and a warm-up pass
excluded). Each run also returns a sha256 of every answer: base and new must answer alike.
Unless ``--no-check``, both trees also answer, untimed, a classify and a fingerprint
request for every SpamAssassin message and a verify request for every dkim-samples message
(keys from the corpus, ARC on), and those digests must agree too (the figures are void
otherwise: exit status 1).

Usage: .venv/bin/python -m bench.bench_child_cpu --base DIR [--src DIR] [--rounds 3]
(``DIR`` holds ``relay/``: ``mkdir -p var/base && git archive HEAD src | tar -x -C
var/base`` gives ``--base var/base/src``; ``--src`` defaults to this checkout's src).
Writes bench/results/child_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.sacorpus import TARBALLS as SA_TARBALLS

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
MODEL = REPO / "models" / "spam.skops"
LIMIT = 5  # DKIM signatures verified a message ([auth] max_signatures' default)
# Timed kinds and the requests each message sends (classify + verify; one fingerprint).
KINDS = {"bench": 2, "sa-median": 2, "fingerprint": 1}

CHECKS = {
    "check-sa": "every SpamAssassin message classified",
    "check-fingerprint": "every SpamAssassin message's text fingerprinted (MinHash)",
    "check-dkim": "every dkim-samples message verified (corpus keys, ARC on)",
}

# -- the requests (the parent builds them once; every run reads the same file) ------------


def shared_dir() -> Path:
    return Path(os.environ.get("RELAY_SHARED", REPO.parent / "shared"))


def _sa_messages() -> list[bytes]:
    corpus = shared_dir() / "corpora" / "spamassassin"
    out: list[bytes] = []
    for name in SA_TARBALLS:
        with tarfile.open(corpus / name) as tar:
            for member in tar:
                fh = tar.extractfile(member) if member.isfile() else None
                if fh is not None and not member.name.endswith("cmds"):
                    out.append(fh.read())
    return out


def _dkim_samples() -> list[tuple[bytes, dict[bytes, bytes | None]]]:
    """(raw message, key records) of each dkim-samples message."""
    tarball = shared_dir() / "corpora" / "dkim-samples" / "dkim-samples.tar.gz"
    messages: list[bytes] = []
    keys: dict[bytes, bytes | None] = {}
    with tarfile.open(tarball) as tar:
        for member in tar:
            fh = tar.extractfile(member) if member.isfile() else None
            if fh is None:
                continue
            path = Path(member.name)
            if path.parent.name == "messages" and path.suffix == ".eml":
                messages.append(fh.read())
            elif path.parent.name == "keys" and path.suffix == ".txt":
                keys[path.stem.encode() + b"."] = fh.read().strip()
    return [(raw, keys) for raw in messages]


def _verify_request(raw: bytes, keys: dict[bytes, bytes | None], arc: bool) -> bytes:
    from relay.auth.wire import VERIFY, encode_request

    head, body = encode_request(raw, keys, LIMIT, arc)
    return VERIFY + head + body


def _fingerprint_requests(raws: list[bytes]) -> list[bytes]:
    from relay.classifier.child import FINGERPRINT, TEXT_ERRORS
    from relay.classifier.features import Extractor

    extractor = Extractor()
    return [
        FINGERPRINT + extractor.extract_bytes(raw).text.encode("utf-8", TEXT_ERRORS) for raw in raws
    ]


def _to_crlf(data: bytes) -> bytes:
    from relay.message import Message

    return Message.from_file_bytes(data, received_at=0.0).raw  # as the relay holds it


def build_requests(sa_count: int) -> dict[str, list[bytes]]:
    """Request lists by name: the timed kinds, and the untimed check sets."""
    from bench.mail import DOMAIN, SELECTOR, build

    with tempfile.TemporaryDirectory() as tmp:
        mail = build(Path(tmp))
    if not mail.signed:
        raise SystemExit("openssl is needed to sign the bench message")
    name = f"{SELECTOR}._domainkey.{DOMAIN}."
    record = mail.zone[name][0][1].encode()
    bench = [b"C" + mail.message, _verify_request(mail.message, {name.encode(): record}, False)]
    corpus = [_to_crlf(raw) for raw in _sa_messages()]
    median = statistics.median(len(raw) for raw in corpus)
    nearest = sorted(corpus, key=lambda raw: (abs(len(raw) - median), raw))[:sa_count]
    sa_median = [r for raw in nearest for r in (b"C" + raw, _verify_request(raw, {}, False))]
    return {
        "bench": bench,
        "sa-median": sa_median,
        "fingerprint": _fingerprint_requests([mail.message, *nearest]),
        "check-sa": [b"C" + raw for raw in corpus],
        "check-fingerprint": _fingerprint_requests(corpus),
        "check-dkim": [_verify_request(_to_crlf(raw), k, True) for raw, k in _dkim_samples()],
    }


def write_requests(path: Path, requests: dict[str, list[bytes]]) -> None:
    with path.open("wb") as fh:
        for name, payloads in requests.items():
            fh.write(struct.pack(">HI", len(name), len(payloads)) + name.encode())
            for payload in payloads:
                fh.write(struct.pack(">I", len(payload)) + payload)


def read_requests(path: Path) -> dict[str, list[bytes]]:
    data = path.read_bytes()
    out: dict[str, list[bytes]] = {}
    at = 0
    while at < len(data):
        size, count = struct.unpack_from(">HI", data, at)
        at += 6
        name = data[at : at + size].decode()
        at += size
        payloads = []
        for _ in range(count):
            (length,) = struct.unpack_from(">I", data, at)
            payloads.append(data[at + 4 : at + 4 + length])
            at += 4 + length
        out[name] = payloads
    return out


# -- one run, in its own interpreter ------------------------------------------------------


def run_worker(src: Path, requests_path: Path, passes: dict[str, int], check: bool) -> None:
    """Load the model with ``src``'s relay, answer every request, print the result JSON."""
    sys.path.insert(0, str(src))
    from relay.analysis import Analysis
    from relay.auth.cryptoproc import load_offline
    from relay.classifier.child import load

    if not Path(sys.modules["relay"].__file__ or "").is_relative_to(src):
        raise SystemExit(f"relay was not imported from {src}")
    served = load(MODEL)
    if served.model is None:
        raise SystemExit(f"cannot load the model: {served.error}")
    load_offline()
    handle = Analysis(served).handle
    requests = read_requests(requests_path)
    result: dict[str, Any] = {}
    for kind, per_message in KINDS.items():
        payloads = requests[kind]
        messages = len(payloads) // per_message
        digest = hashlib.sha256()
        for payload in payloads:  # warm-up: caches as a running child has them
            digest.update(handle(payload))
        start = time.process_time()
        for _ in range(passes[kind]):
            for payload in payloads:
                handle(payload)
        cpu = time.process_time() - start
        result[kind] = {
            "messages": messages * passes[kind],
            "cpu_ms_per_msg": cpu * 1000 / (messages * passes[kind]),
            "sha256": digest.hexdigest(),
        }
    if check:
        for name in CHECKS:
            digest = hashlib.sha256()
            for payload in requests[name]:
                digest.update(handle(payload))
            result[name] = {"requests": len(requests[name]), "sha256": digest.hexdigest()}
    json.dump(result, sys.stdout)


def run(src: Path, requests_path: Path, passes: dict[str, int], check: bool) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "bench.bench_child_cpu",
        "--worker",
        "--src",
        str(src),
        "--requests",
        str(requests_path),
        "--passes",
        json.dumps(passes),
    ]
    if check:
        command.append("--check")
    done = subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


# -- the side-by-side comparison ----------------------------------------------------------


def _interleaved(rounds: int) -> Iterator[tuple[int, str]]:
    for round_ in range(rounds):
        yield from ((round_, label) for label in ("base", "new"))


def compare(
    trees: dict[str, Path],
    rounds: int,
    sa_count: int,
    passes: dict[str, int],
    check: bool,
    base_label: str,
) -> dict[str, Any]:
    load_before = os.getloadavg()
    runs: dict[str, list[dict[str, Any]]] = {"base": [], "new": []}
    with tempfile.TemporaryDirectory() as tmp:
        requests_path = Path(tmp) / "requests.bin"
        requests = build_requests(sa_count)
        write_requests(requests_path, requests)
        for round_, label in _interleaved(rounds):
            runs[label].append(run(trees[label], requests_path, passes, check and round_ == 0))
    load_after = os.getloadavg()
    kinds: dict[str, Any] = {}
    for kind in KINDS:
        base = [r[kind]["cpu_ms_per_msg"] for r in runs["base"]]
        new = [r[kind]["cpu_ms_per_msg"] for r in runs["new"]]
        digests = {r[kind]["sha256"] for r in runs["base"] + runs["new"]}
        kinds[kind] = {
            "messages_per_run": runs["new"][0][kind]["messages"],
            "base_ms": [round(x, 4) for x in base],
            "new_ms": [round(x, 4) for x in new],
            "base_median_ms": round(statistics.median(base), 4),
            "new_median_ms": round(statistics.median(new), 4),
            "saved_ms": round(statistics.median(base) - statistics.median(new), 4),
            "ratio": round(statistics.median(new) / statistics.median(base), 3),
            "answers_identical": len(digests) == 1,
        }
    checks = {}
    if check:
        for name in CHECKS:
            base, new = runs["base"][0][name], runs["new"][0][name]
            checks[name] = {"requests": new["requests"], "identical": base == new}
    return {
        "what": "analysis child CPU per message of its request handling, base vs new",
        "base": base_label,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "rounds": rounds,
        "sa_median_messages": sa_count,
        "passes": passes,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "kinds": kinds,
        "checks": checks,
    }


def markdown(data: dict[str, Any]) -> str:
    lines = [
        "# Analysis child: CPU per message, base vs new",
        "",
        "Written by `python -m bench.bench_child_cpu` (method in its docstring and in "
        "docs/benchmarks.md). Process CPU time of the child's request handler "
        "(`Analysis.handle`: one classify and one verify request a message; fingerprint: "
        "one MinHash request), in-process, "
        f"median of {data['rounds']} interleaved rounds per tree, each in its own "
        f"interpreter; Python {data['python']}, {data['cpus']} CPUs, load average "
        f"{data['load_average_before'][0]:.1f} before and "
        f"{data['load_average_after'][0]:.1f} after (a shared machine: compare the ratio). "
        f"Base: {data['base'] or 'the tree given'}; new: this checkout.",
        "",
        "| messages | per run | base ms/msg (rounds) | new ms/msg (rounds) | saved ms | new / base "
        "| answers identical |",
        "|---|---:|---|---|---:|---:|---|",
    ]
    for kind, row in data["kinds"].items():
        rounds_base = ", ".join(f"{x:.3f}" for x in row["base_ms"])
        rounds_new = ", ".join(f"{x:.3f}" for x in row["new_ms"])
        lines.append(
            f"| {kind} | {row['messages_per_run']:,} | {row['base_median_ms']:.3f} "
            f"({rounds_base}) | {row['new_median_ms']:.3f} ({rounds_new}) | "
            f"{row['saved_ms']:.3f} | {row['ratio']:.3f} | "
            f"{'yes' if row['answers_identical'] else '**NO**'} |"
        )
    lines.append("")
    for name, check in data["checks"].items():
        verdict = "identical" if check["identical"] else "**DIFFERENT**"
        lines.append(f"- {CHECKS[name]}: {check['requests']} answers, base and new {verdict}")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--base", type=Path, help="the tree to compare against (holds relay/)")
    parser.add_argument("--src", type=Path, default=REPO / "src", help="the new tree")
    parser.add_argument("--base-label", default="", help="what the base is (a git revision)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sa-messages", type=int, default=1000)
    parser.add_argument("--bench-passes", type=int, default=2000)
    parser.add_argument("--sa-passes", type=int, default=2)
    parser.add_argument("--no-check", action="store_true", help="skip the untimed checks")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--passes", help=argparse.SUPPRESS)
    parser.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(args.src.resolve(), args.requests, json.loads(args.passes), args.check)
        return 0
    if args.base is None:
        parser.error("--base DIR is needed")
    trees = {"base": args.base.resolve(), "new": args.src.resolve()}
    passes = {"bench": args.bench_passes, "sa-median": args.sa_passes, "fingerprint": 1}
    data = compare(trees, args.rounds, args.sa_messages, passes, not args.no_check, args.base_label)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "child_cpu.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / "child_cpu.md").write_text(markdown(data))
    sys.stdout.write(markdown(data))
    identical = all(k["answers_identical"] for k in data["kinds"].values()) and all(
        c["identical"] for c in data["checks"].values()
    )
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())

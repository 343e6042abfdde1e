"""The lab at scale: 10k, 100k (1M) synthetic messages x every shipped regime, on 2 cores.

    .venv/bin/python -m bench.bench_labscale --sizes 10000 100000
    .venv/bin/python -m bench.bench_labscale --sizes 10000 --engine dask   # loopback cluster
    .venv/bin/python -m bench.bench_labscale --sizes 10000 --code COPY --tag NAME  # a given copy

Messages are synthesised from the SpamAssassin corpus (var/sa, or ../shared's tarballs
extracted there) by deterministic, seeded perturbation (``perturb``): a new topmost
Received field (a public client address and a time inside a 30-day window, in corpus
order), a new Message-ID and Date, sender addresses with a suffixed local part and
half the time a subdomain, and a few words swapped or inserted in body lines (only lines
with spaces: base64 never has any, so encoded parts stay decodable). Every message is
distinct (the cache and the bulk counts see N different messages) and keeps the label
of the message it came from. They are written to an uncompressed tar plus a labels TSV
under var/labscale/N (about 7 KB per message on disk); they are never sent anywhere.

Per size, `relay lab` runs as a separate process three times over the same cache: cold
(empty cache), warm (nothing changed) and changed (one threshold of one regime moved, in
a copy of the regime files: the facts are all cached, so only the evaluation and the
report should cost). Wall time, CPU and peak PSS of the whole process tree are measured
as in bench_lab.py. Results: bench/results/labscale.{json,md} (sizes merge into the file,
so a rerun of one size keeps the others).
``--reuse`` keeps a size's corpus and fact cache and runs warm and changed only (a cold
run at 1M takes over an hour); ``--changed-to`` picks the changed line, which must be one
not run before over that cache, or its decisions are read back and nothing is decided.
Targets (issue 18): 1M messages x 6 regimes < 1 h cold on 2 cores; warm rerun of one
changed regime < 2 min.
"""

from __future__ import annotations

import argparse
import email.utils
import hashlib
import io
import json
import os
import random
import re
import shutil
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import bench_lab

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
SCRATCH = REPO / "var" / "labscale"
WINDOW_START = 1136073600.0  # 2006-01-01 UTC: after every SpamAssassin message
WINDOW_SECONDS = 30 * 86400.0
TARGETS = {"cold_1m_seconds": 3600.0, "changed_seconds": 120.0}
CHANGED_REGIME = "classifier_baseline.toml"
CHANGED_FROM, CHANGED_TO = "quarantine = 10.0", "quarantine = 9.0"
# Public first octets (no private, loopback or documentation ranges).
_OCTETS = (23, 45, 62, 80, 91, 104, 151, 185, 203, 212)
_WORDS = (
    "the", "and", "offer", "today", "meeting", "please", "free", "update", "list",
    "project", "report", "click", "thanks", "money", "account", "patch", "release",
    "week", "order", "price", "team", "question", "limited", "again", "system",
)  # fmt: skip
_ADDRESS = re.compile(r"[A-Za-z0-9._%+=-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
_MESSAGE_ID = re.compile(r"^Message-I[Dd]:[^\n]*(?:\n[ \t][^\n]*)*\n", re.MULTILINE | re.I)
_DATE = re.compile(r"^Date:[^\n]*(?:\n[ \t][^\n]*)*\n", re.MULTILINE | re.IGNORECASE)
_FROM = re.compile(r"^(?:From|Return-Path):[^\n]*", re.MULTILINE | re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Base:
    """A corpus message synthetic ones are made from."""

    label: str
    set: str
    raw: bytes


def base_messages(root: Path, labels: Path) -> list[Base]:
    """The labelled messages of ``labels`` under ``root`` (unreadable ones left out)."""
    from relay.corpus import read, read_labels

    return [
        Base(item.label, item.set, data)
        for item, data in read(read_labels(root, labels))
        if isinstance(data, bytes) and data.strip()
    ]


def _new_address(address: str, token: str, rng: random.Random) -> str:
    local, _, domain = address.rpartition("@")
    if rng.random() < 0.5:
        domain = f"s{rng.randrange(50)}.{domain}"
    return f"{local}.{token}@{domain}"


def _perturb_body(body: str, rng: random.Random) -> str:
    lines = body.split("\n")
    wordy = [i for i, line in enumerate(lines) if line.count(" ") >= 2 and line[:2] != "--"]
    for _ in range(rng.randint(1, 3) if wordy else 0):
        at = rng.choice(wordy)
        words = lines[at].split(" ")
        # Inner positions only: a quoted-printable soft break ("=" at the end) stays last.
        pos = rng.randrange(1, len(words) - 1)
        if rng.random() < 0.5:
            words[pos], words[pos - 1] = words[pos - 1], words[pos]
        else:
            words.insert(pos, rng.choice(_WORDS))
        lines[at] = " ".join(words)
    return "\n".join(lines)


def perturb(raw: bytes, index: int, seed: int, when: float) -> bytes:
    """Message ``index`` of a synthetic corpus made from ``raw``, arriving at ``when``.

    Deterministic in (raw, index, seed, when). latin-1 maps bytes to characters one to
    one, so whatever the message's charset the bytes not perturbed are kept exactly."""
    rng = random.Random(f"{seed}:{index}")
    text = raw.decode("latin-1")
    mbox = ""
    if text.startswith("From "):
        mbox, _, text = text.partition("\n")
        mbox += "\n"
    head, sep, body = text.partition("\n\n")
    head += "\n"
    token = f"{index:x}{rng.randrange(16**4):04x}"
    found = _FROM.findall(head) + ([mbox] if mbox else [])
    senders = dict.fromkeys(a for line in found for a in _ADDRESS.findall(line))
    for old in senders:
        new = _new_address(old, token, rng)
        head, mbox = head.replace(old, new), mbox.replace(old, new)
    domain = next(iter(senders), "labscale.example").rpartition("@")[2]
    stamp = email.utils.formatdate(when, usegmt=True)
    head = _MESSAGE_ID.sub("", head) + f"Message-ID: <syn.{token}.{seed}@{domain}>\n"
    head = _DATE.sub("", head) + (
        f"Date: {email.utils.formatdate(when - rng.randint(20, 900), usegmt=True)}\n"
    )
    ip = f"{rng.choice(_OCTETS)}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
    received = (
        f"Received: from mail.{domain} (mail.{domain} [{ip}])\n"
        f"\tby mx.labscale.example (Postfix) with ESMTP id {token.upper()}; {stamp}\n"
    )
    out = mbox + received + head.rstrip("\n") + "\n" + sep[1:] + _perturb_body(body, rng)
    return out.encode("latin-1")


def synthesise(
    bases: Sequence[Base], count: int, seed: int = 0
) -> Iterator[tuple[str, str, str, bytes]]:
    """``count`` messages as (member path, label, set, bytes), in arrival order: message
    i is made from base i mod len(bases) (in a seeded shuffled order), so the label mix is
    the corpus's."""
    step = WINDOW_SECONDS / count
    order = list(bases)
    random.Random(seed).shuffle(order)  # labels and eras interleave in arrival order
    for i in range(count):
        base = order[i % len(order)]
        when = WINDOW_START + i * step
        yield (
            f"syn/{base.label}/{i:07d}.eml",
            base.label,
            base.set,
            perturb(base.raw, i, seed, when),
        )


def write_corpus(bases: Sequence[Base], count: int, into: Path, seed: int = 0) -> dict[str, Any]:
    """Synthesise into ``into``/corpus.tar and labels.tsv (atomically: a half-written
    corpus is never reused). Returns its size on disk."""
    into.mkdir(parents=True, exist_ok=True)
    tar_path, labels_path = into / "corpus.tar", into / "labels.tsv"
    if not (tar_path.exists() and labels_path.exists()):
        partial = into / "corpus.tar.part"
        with tarfile.open(partial, "w") as tar, (into / "labels.part").open("w") as labels:
            labels.write("relative_path\tlabel\tset\n")
            for name, label, set_name, data in synthesise(bases, count, seed):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
                labels.write(f"{name}\t{label}\t{set_name}\n")
        partial.rename(tar_path)
        (into / "labels.part").rename(labels_path)
    return {"tar_bytes": tar_path.stat().st_size, "labels_bytes": labels_path.stat().st_size}


def regime_copies(
    into: Path, regimes: Path, changed_to: str = CHANGED_TO
) -> tuple[list[str], list[str]]:
    """Two copies of ``regimes``/*.toml: as they are, and with one threshold moved."""
    same, changed = into / "regimes-same", into / "regimes-changed"
    for d in (same, changed):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        for p in regimes.glob("*.toml"):
            shutil.copy(p, d / p.name)
    target = changed / CHANGED_REGIME
    text = target.read_text()
    if CHANGED_FROM not in text:
        raise SystemExit(f"{CHANGED_REGIME}: no {CHANGED_FROM!r} to change")
    target.write_text(text.replace(CHANGED_FROM, changed_to, 1))
    return sorted(str(p) for p in same.glob("*.toml")), sorted(
        str(p) for p in changed.glob("*.toml")
    )


def run(cmd: list[str], sample: float, cwd: Path, env: dict[str, str]) -> dict[str, Any]:
    """bench_lab.run in the frozen copy's folder and environment: wall time, CPU of the
    whole process tree (last sample per process) and peak summed PSS and RSS."""
    return bench_lab.run(cmd, sample, cwd=cwd, env=env)


def _summary(r: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    return {**{k: v for k, v in r.items() if k != "stdout"}, "timings": report["timings"]}


def snapshot(into: Path) -> dict[str, str]:
    """A frozen copy of src/, config/ and models/ the runs use (cwd and PYTHONPATH).

    Other work changes fact versions and the model while a long benchmark runs; a warm
    run against changed code recomputes those facts and measures the change, not the
    cache. Returns the environment for the lab process."""
    shutil.rmtree(into, ignore_errors=True)
    for name in ("src", "config", "models"):
        shutil.copytree(REPO / name, into / name, ignore=shutil.ignore_patterns("__pycache__"))
    return {**os.environ, "PYTHONPATH": str(into / "src")}


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def measure(
    size: int, args: argparse.Namespace, bases: Sequence[Base], env: dict[str, str], code: Path
) -> dict[str, Any]:
    scratch = SCRATCH / str(size)
    t = time.perf_counter()
    disk = write_corpus(bases, size, scratch, args.seed)
    synth_seconds = round(time.perf_counter() - t, 1)
    same, changed = regime_copies(scratch, code / "config" / "regimes", args.changed_to)
    cache = scratch / f"cache-{args.engine}"
    if args.reuse:
        if not (cache / "facts.sqlite3").exists():
            raise SystemExit(f"--reuse: no cache at {cache}")
    else:
        shutil.rmtree(cache, ignore_errors=True)
    base = [
        sys.executable, "-m", "relay.cli", "lab",
        "--corpus", str(scratch / "corpus.tar"), "--labels", str(scratch / "labels.tsv"),
        "--config", str(code / "config" / "relay.toml"),
        "--cache", str(cache), "--jobs", str(args.jobs), "--no-progress",
        "--engine", args.engine,
    ]  # fmt: skip
    runs: dict[str, Any] = {}
    plan = [("cold", same), ("warm", same), ("changed", changed)]
    for name, regimes in plan[1:] if args.reuse else plan:
        out = scratch / f"out-{name}"
        shutil.rmtree(out, ignore_errors=True)
        r = run([*base, "--out", str(out), "--policy", *regimes], args.sample, code, env)
        report = json.loads((out / "report.json").read_text())
        runs[name] = _summary(r, report)
        print(f"{size} {name}: {r['seconds']} s, {r['cpu_seconds']} s CPU", file=sys.stderr)
    cache_bytes = sum(p.stat().st_size for p in cache.iterdir())
    per_message_cpu = runs["cold"]["cpu_seconds"] / size if "cold" in runs else None
    return {
        "messages": report["corpus"]["readable"],
        "unreadable": len(report["corpus"]["unreadable"]),
        "regimes": [r["name"] for r in report["regimes"]],
        "engine": args.engine,
        "jobs": args.jobs,
        "synthesis_seconds": synth_seconds,
        "disk": {**disk, "cache_bytes": cache_bytes},
        "runs": runs,
        "cold_cpu_ms_per_message": None
        if per_message_cpu is None
        else round(1000 * per_message_cpu, 2),
        "figures": [
            {
                "name": r["name"],
                "spam_stopped": r["spam_stopped"]["rate"],
                "ham_blocked": r["ham_blocked"]["rate"],
            }
            for r in report["regimes"]
        ],
    }


def extrapolation(results: dict[str, Any]) -> list[str]:
    """1M messages from the largest local size measured, linearly (CPU per message and
    the per-message memory slope between the two largest sizes), per tag (one tree):
    an extrapolation, labelled as one."""
    out: list[str] = []
    tags = sorted({s.get("tag", "") for s in results["sizes"].values()})
    for tag in tags:
        local = sorted(
            (
                s
                for s in results["sizes"].values()
                if s["engine"] == "local" and s.get("tag", "") == tag and "cold" in s["runs"]
            ),
            key=lambda s: s["messages"],
        )
        if not local or (tag and len(local) < 2):
            continue  # a tagged tree measured at one size: no slope to extrapolate
        out += _extrapolate(local, f" ({tag})" if tag else " (untagged rows)")
    return out


def _extrapolate(local: list[dict[str, Any]], label: str) -> list[str]:
    big = local[-1]
    n, jobs = big["messages"], big["jobs"]
    cold_cpu = big["runs"]["cold"]["cpu_seconds"] / n * 1_000_000
    changed_cpu = big["runs"]["changed"]["cpu_seconds"] / n * 1_000_000
    out = [
        f"Extrapolated to 1,000,000 messages from {n}{label} (linear; not measured): cold "
        f"{cold_cpu / 3600:.1f} h of CPU, at best {cold_cpu / jobs / 3600:.1f} h on {jobs} "
        f"otherwise idle cores (target < 1 h); the changed-regime rerun {changed_cpu:.0f} s "
        f"of CPU, mostly single-threaded (target < 120 s)."
    ]
    if len(local) > 1:
        small = local[-2]
        for name in ("cold", "warm", "changed"):
            a, b = small["runs"][name]["peak_pss_bytes"], big["runs"][name]["peak_pss_bytes"]
            slope = (b - a) / (n - small["messages"])
            base = a - slope * small["messages"]
            out.append(
                f"Peak PSS{label}, {name}: {base / 2**20:.0f} MiB + {slope / 1024:.1f} KiB per "
                f"message (from {small['messages']} and {n}); 1M messages: "
                f"{(base + slope * 1e6) / 2**30:.1f} GiB."
            )
    return out


def _secs(x: float) -> str:
    return f"{x:.1f}" if x < 10 else f"{x:.0f}"


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# The lab at scale",
        "",
        "Synthetic corpora from the SpamAssassin corpus (bench/bench_labscale.py), every "
        "shipped regime, `relay lab` cold, warm and after one changed threshold. Wall "
        "time depends on what else ran (the load average, before/after); CPU of the whole "
        "process tree does not.",
        "",
        "| messages | engine | run | wall | CPU (tree) | CPU ms/msg | peak PSS (RSS) "
        "| facts / evaluate / report (s) | load avg |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(results["sizes"], key=lambda k: (int(k.split("-")[0]), k)):
        s = results["sizes"][key]
        for name in ("cold", "warm", "changed"):
            if name not in s["runs"]:
                continue  # --reuse: no cold run
            r = s["runs"][name]
            t = r["timings"]
            lines.append(
                f"| {s['messages']} | {s['engine']}{' (' + s['tag'] + ')' if s.get('tag') else ''} "
                f"| {name} | {r['seconds']:.0f} s "
                f"| {r['cpu_seconds']:.0f} s | {1000 * r['cpu_seconds'] / s['messages']:.2f} "
                f"| {r['peak_pss_bytes'] / 2**20:.0f} MiB ({r['peak_rss_bytes'] / 2**20:.0f} MiB) "
                f"| {_secs(t['facts'])} / {_secs(t['evaluate'])} / {_secs(t['report'])} "
                f"| {r['load_average_1m'][0]} / {r['load_average_1m'][1]} |"
            )
    lines += ["", "Disk: synthetic tar, labels and fact cache per size:", ""]
    for key, s in sorted(results["sizes"].items()):
        d = s["disk"]
        lines.append(
            f"- {key}: tar {d['tar_bytes'] / 2**20:.0f} MiB, labels "
            f"{d['labels_bytes'] / 2**20:.1f} MiB, cache {d['cache_bytes'] / 2**20:.0f} MiB "
            f"(synthesised in {s['synthesis_seconds']} s; 0: an earlier run's, reused)"
        )
    lines += ["", *extrapolation(results)]
    if results.get("notes"):
        lines += ["", *results["notes"]]
    lines += [
        "",
        "Command: `.venv/bin/python -m bench.bench_labscale --sizes 10000 100000`; two trees "
        "side by side: `--code DIR --tag NAME` per frozen copy; over an existing corpus and "
        "cache, warm and changed only: `--reuse --changed-to 'quarantine = 8.5'`.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engine", choices=("local", "dask"), default="local")
    parser.add_argument("--corpus", type=Path, default=REPO / "var" / "sa")
    parser.add_argument(
        "--labels",
        type=Path,
        default=REPO.parent / "shared" / "corpora" / "spamassassin" / "split.tsv",
    )
    parser.add_argument("--synthesise-only", action="store_true")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="keep the size's existing corpus and fact cache: warm and changed runs only",
    )
    parser.add_argument(
        "--changed-to",
        default=CHANGED_TO,
        help=f"the changed run's line in {CHANGED_REGIME} (default {CHANGED_TO!r}); a value "
        "not run before over this cache, or its decisions are read back",
    )
    parser.add_argument("--tag", default="", help="kept beside an untagged run of a size")
    parser.add_argument("--sample", type=float, default=0.25, help="/proc sampling, seconds")
    parser.add_argument(
        "--code",
        type=Path,
        help="an existing frozen copy (src/, config/, models/) to run instead of a fresh "
        "snapshot of the tree: two copies taken together compare one change side by side",
    )
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))[: args.jobs]
    os.sched_setaffinity(0, cores)  # the lab and its workers inherit this
    bases = base_messages(args.corpus, args.labels)
    if args.synthesise_only:
        for size in args.sizes:
            print(size, write_corpus(bases, size, SCRATCH / str(size), args.seed))
        return 0
    path = RESULTS / "labscale.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"sizes": {}}
    if args.code is None:
        code = SCRATCH / "code"
        env = snapshot(code)
    else:
        code = args.code.resolve()
        env = {**os.environ, "PYTHONPATH": str(code / "src")}
    for size in args.sizes:
        result = measure(size, args, bases, env, code)
        result["code_digest"] = tree_digest(code / "src")
        result["tag"] = args.tag
        key = f"{size}-{args.engine}" + (f"-{args.tag}" if args.tag else "")
        results["sizes"][key] = result
        RESULTS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1) + "\n")
        (RESULTS / "labscale.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

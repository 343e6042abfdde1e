"""Regulation lab on the full SpamAssassin corpus: every shipped regime, cold and warm cache.

    .venv/bin/python -m bench.bench_lab             # writes bench/results/lab.{json,md}
    .venv/bin/python -m bench.bench_lab --jobs 2 --keep var/lab-bench

Extracts the five tarballs of ../shared/corpora/spamassassin (or $RELAY_SHARED) into a
scratch directory, then runs `relay lab` as a separate process over all 6046 messages and
all config/regimes/*.toml twice: cold (empty fact cache) and warm (the cache of the cold
run). The bench process is pinned to --jobs cores, and its children inherit that. Wall
time, CPU and peak memory (PSS, so pages shared between processes count once) are
measured over the lab's whole process tree, sampled from /proc.
Targets (issue 7): cold < 3 min, warm < 20 s, memory < 1 GB, on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.procstats import CLOCK_TICKS, descendants, rss_bytes
from bench.sacorpus import TARBALLS

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"cold_seconds": 180.0, "warm_seconds": 20.0, "peak_pss_bytes": 1024**3}


def shared_dir() -> Path:
    return Path(os.environ.get("RELAY_SHARED", REPO.parent / "shared"))


def extract(corpus: Path, into: Path) -> None:
    target = into / "sa"
    target.mkdir(parents=True)
    for name in TARBALLS:
        with tarfile.open(corpus / name) as tar:
            tar.extractall(target, filter="data")


def _proc_cpu(pid: int) -> float | None:
    """User + system CPU seconds of one live process (/proc/<pid>/stat)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _pss_bytes(pids: list[int]) -> int:
    """Proportional set size summed over processes: shared pages (the forkserver's
    imports, the model) are split between the processes sharing them, not counted in
    each as RSS would."""
    total = 0
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            if line.startswith("Pss:"):
                total += int(line.split()[1]) * 1024
                break
    return total


def run(
    cmd: list[str],
    sample: float = 0.1,
    cwd: Path = REPO,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run the command; wall time, peak memory and CPU of its whole process tree.

    The tree (lab, forkserver, fact workers, classifier processes, manager) is sampled
    from /proc every ``sample`` seconds: CPU is the sum over every process seen of its
    last sampled CPU time (a process that ends loses at most one interval); memory is
    the peak of the summed PSS, and of the summed RSS for comparison. On a shared machine
    wall time depends on what else runs; CPU does not.
    """
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak_rss = peak_pss = 0
    cpu: dict[int, float] = {}
    while proc.poll() is None:
        pids = descendants(proc.pid)
        for pid in pids:
            seconds = _proc_cpu(pid)
            if seconds is not None:
                cpu[pid] = seconds
        peak_rss = max(peak_rss, rss_bytes(pids))
        peak_pss = max(peak_pss, _pss_bytes(pids))
        time.sleep(sample)
    out, err = proc.communicate()
    seconds = time.perf_counter() - start
    if proc.returncode not in (0, 1):  # 1: a regime file had errors (reported, not fatal)
        sys.stderr.write(err.decode(errors="replace"))
        raise SystemExit(f"relay lab failed with exit code {proc.returncode}")
    return {
        "seconds": round(seconds, 2),
        "peak_pss_bytes": peak_pss,
        "peak_rss_bytes": peak_rss,
        "cpu_seconds": round(sum(cpu.values()), 1),
        "processes": len(cpu),
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "stdout": out.decode(errors="replace").strip(),
    }


def markdown(result: dict[str, Any]) -> str:
    cold, warm = result["cold"], result["warm"]
    ok = result["meets_targets"]
    lines = [
        "# Regulation lab benchmark",
        "",
        f"{result['messages']} messages (SpamAssassin public corpus), "
        f"{len(result['regimes'])} regimes, {result['jobs']} cores "
        f"({result['machine']['cpu']}), DNS {result['dns']}.",
        "",
        "| run | wall time | target | CPU (process tree) | CPU / cores | peak memory, PSS "
        "(RSS) | target | load avg (1 min, before/after) |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {label} cache | {r['seconds']:.1f} s | < {TARGETS[key]:.0f} s "
            f"| {r['cpu_seconds']:.1f} s | {r['cpu_seconds'] / result['jobs']:.1f} s "
            f"| {r['peak_pss_bytes'] / 2**20:.0f} MiB ({r['peak_rss_bytes'] / 2**20:.0f} MiB) "
            f"| < 1024 MiB | {r['load_average_1m'][0]} / {r['load_average_1m'][1]} |"
            for label, key, r in (("cold", "cold_seconds", cold), ("warm", "warm_seconds", warm))
        ),
        "",
        f"Targets met (wall time): cold {ok['cold']}, warm {ok['warm']}, memory {ok['memory']}. "
        f"CPU / cores is the wall time the run would take if it had the {result['jobs']} cores "
        "to itself (a lower bound); the machine was shared when the load average exceeds "
        f"{result['jobs']}.",
        "",
        "Lab phases of the cold run (seconds): "
        + ", ".join(f"{k} {v}" for k, v in result["cold_timings"].items()),
        "",
        "Lab phases of the warm run (seconds): "
        + ", ".join(f"{k} {v}" for k, v in result["warm_timings"].items()),
        "",
        "| regime | spam stopped | legitimate mail blocked | content read (T3) |",
        "|---|---|---|---|",
    ]
    for r in result["figures"]:
        lines.append(
            f"| {r['name']} | {100 * (r['spam_stopped'] or 0):.1f}% "
            f"| {100 * (r['ham_blocked'] or 0):.1f}% | {100 * (r['content_read'] or 0):.1f}% |"
        )
    lines += ["", "Command: `.venv/bin/python -m bench.bench_lab`", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="scratch directory to use and keep")
    args = parser.parse_args()
    corpus = shared_dir() / "corpora" / "spamassassin"
    if not (corpus / "split.tsv").exists():
        print(f"SpamAssassin corpus not found under {corpus}; set RELAY_SHARED", file=sys.stderr)
        return 2
    cores = sorted(os.sched_getaffinity(0))[: args.jobs]
    os.sched_setaffinity(0, cores)  # children (the lab and its workers) inherit this
    scratch = args.keep or Path(tempfile.mkdtemp(prefix="relay-bench-lab-"))
    try:
        if not (scratch / "sa").exists():
            extract(corpus, scratch)
        for stale in ("cache", "out-cold", "out-warm"):
            shutil.rmtree(scratch / stale, ignore_errors=True)
        regimes = sorted(str(p) for p in (REPO / "config" / "regimes").glob("*.toml"))
        base = [
            sys.executable, "-m", "relay.cli", "lab",
            "--corpus", str(scratch), "--labels", str(corpus / "split.tsv"),
            "--config", str(REPO / "config" / "relay.toml"),
            "--cache", str(scratch / "cache"), "--jobs", str(args.jobs), "--no-progress",
            "--policy", *regimes,
        ]  # fmt: skip
        cold = run([*base, "--out", str(scratch / "out-cold")])
        warm = run([*base, "--out", str(scratch / "out-warm")])
        report = json.loads((scratch / "out-warm" / "report.json").read_text())
        cold_report = json.loads((scratch / "out-cold" / "report.json").read_text())
    finally:
        if args.keep is None:
            shutil.rmtree(scratch, ignore_errors=True)
    result: dict[str, Any] = {
        "messages": report["corpus"]["messages"],
        "readable": report["corpus"]["readable"],
        "unreadable": len(report["corpus"]["unreadable"]),
        "regimes": [r["name"] for r in report["regimes"]],
        "regime_errors": report["regime_errors"],
        "jobs": args.jobs,
        "dns": report["dns"]["mode"],
        "machine": {"cpu": platform.processor() or platform.machine(), "cores_used": cores},
        "cold": cold,
        "warm": warm,
        "cold_timings": cold_report["timings"],
        "warm_timings": report["timings"],
        "facts": {k: v for k, v in cold_report["facts"].items() if k != "errors"},
        "figures": [
            {
                "name": r["name"],
                "spam_stopped": r["spam_stopped"]["rate"],
                "ham_blocked": r["ham_blocked"]["rate"],
                "content_read": r["content_read"]["rate"],
            }
            for r in report["regimes"]
        ],
        "targets": TARGETS,
        "meets_targets": {
            "cold": cold["seconds"] < TARGETS["cold_seconds"],
            "warm": warm["seconds"] < TARGETS["warm_seconds"],
            "memory": max(cold["peak_pss_bytes"], warm["peak_pss_bytes"])
            < TARGETS["peak_pss_bytes"],
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    # The scratch folder is this machine's own: never recorded in the results.
    text = json.dumps(result, indent=1).replace(str(scratch), "<scratch>")
    (RESULTS / "lab.json").write_text(text + "\n")
    (RESULTS / "lab.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

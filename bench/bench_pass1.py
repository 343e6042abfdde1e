"""CPU of the lab's pass 1 (the stateless facts), per message and per fact.

    # where the CPU goes: every fact of the shipped regimes, one message at a time
    .venv/bin/python -m bench.bench_pass1 breakdown --corpus C.tar --labels L.tsv -n 1500
    # cold `relay lab` runs of two source trees, alternated (CPU of the whole tree)
    .venv/bin/python -m bench.bench_pass1 compare --corpus C.tar --labels L.tsv \
        --tree before=var/base/src --tree after=src --rounds 2

``breakdown`` runs in this process with the lab's own services (offline DNS, the shipped
model in its child, the regimes' oracle inputs): each message's facts are asked for one at
a time, dependencies first, so the time a fact takes is its own. CPU is this process's
(``time.process_time``, threads included) plus the classifier child's, read from /proc
around each fact. ``compare`` runs ``relay lab --no-cache`` on the same corpus with each
tree on PYTHONPATH, in turn, and sums the CPU of every process of the run, in total and by
role (driver; pool workers; classifier children); side by side in one session, so a busy
machine slows both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench import bench_lab
from bench.procstats import descendants

REPO = Path(__file__).resolve().parents[1]
REGIMES = REPO / "config" / "regimes"
RESULTS = Path(__file__).resolve().parent / "results"


def _regime_files() -> list[Path]:
    return sorted(REGIMES.glob("*.toml"))


def _children_cpu() -> float:
    """CPU seconds of this process's descendants (the classifier and auth children)."""
    me = os.getpid()
    return sum(bench_lab._proc_cpu(p) or 0.0 for p in descendants(me) if p != me)


def _order(registry: Any, names: list[str]) -> list[str]:
    """``names`` and their dependencies, every dependency before its readers."""
    done: list[str] = []

    def visit(name: str) -> None:
        if name in done:
            return
        for dep in registry[name].depends:
            visit(dep)
        done.append(name)

    for name in names:
        visit(name)
    return done


async def _breakdown(args: argparse.Namespace) -> dict[str, Any]:
    from relay.config import load_settings
    from relay.errors import FactError
    from relay.facts import Facts
    from relay.lab.corpus import load_corpus, sources_from_labels
    from relay.lab.env import LabEnv, lab_services
    from relay.lab.evaluate import load_regimes, needed_facts

    settings = load_settings(REPO / "config" / "relay.toml")
    env = LabEnv(
        settings=settings,
        trusted_authserv_ids=(settings.authserv_id,),
        inputs=REGIMES / "inputs",
    )
    registry = env.registry()
    regimes, problems = load_regimes(_regime_files(), registry)
    assert not problems, problems
    wanted = needed_facts(regimes, registry)
    corpus = load_corpus(sources_from_labels(args.corpus, args.labels, None), "bench")
    messages = corpus.messages[: args.n]
    own: dict[str, float] = defaultdict(float)
    child: dict[str, float] = defaultdict(float)
    order = _order(registry, wanted)
    # the collector settings the tree's pool workers compute a share with (none before)
    from relay.lab import compute

    collections = getattr(compute, "fewer_collections", contextlib.nullcontext)
    with tempfile.TemporaryDirectory(prefix="bench-pass1-") as tmp, collections():
        async with lab_services(env, Path(tmp), stateful=False) as services:
            start_cpu, start_child = time.process_time(), _children_cpu()
            start = time.perf_counter()
            for m in messages:
                c0 = time.process_time()
                message = m.to_message()
                own["(read + Message)"] += time.process_time() - c0
                facts = Facts(registry, message, services)
                for name in order:
                    c0, k0 = time.process_time(), _children_cpu() if args.children else 0.0
                    with contextlib.suppress(FactError):
                        await facts.get(name)
                    own[name] += time.process_time() - c0
                    if args.children:
                        child[name] += _children_cpu() - k0
            wall = time.perf_counter() - start
            total = time.process_time() - start_cpu
            children = _children_cpu() - start_child
    n = len(messages)
    return {
        "messages": n,
        "facts": len(wanted),
        "wall_ms_per_message": round(1000 * wall / n, 3),
        "process_ms_per_message": round(1000 * total / n, 3),
        "children_ms_per_message": round(1000 * children / n, 3),
        "per_fact_ms": {
            k: round(1000 * v / n, 4) for k, v in sorted(own.items(), key=lambda kv: -kv[1])
        },
        "per_fact_child_ms": {k: round(1000 * v / n, 4) for k, v in child.items() if v > 0},
    }


def _role(pid: int) -> str:
    """Which part of a lab run a process is, from its command line."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return "other"
    if "relay.cli lab" in cmd:
        return "driver"  # reading, pass 2, evaluation, report
    if "relay.analysis" in cmd or "relay.classifier.child" in cmd:
        return "classifier children"  # pass 1: the model and the fingerprints
    if "forkserver" in cmd or "spawn_main" in cmd:
        return "pool workers"  # pass 1: every other fact (and the forkserver itself)
    return "other"


def _run(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Wall time and CPU seconds of every process of the run (sampled from /proc every
    0.1 s, last sample per process), summed by role."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    cpu: dict[int, float] = {}
    roles: dict[int, str] = {}
    while proc.poll() is None:
        for pid in descendants(proc.pid):
            seconds = bench_lab._proc_cpu(pid)
            if seconds is not None:
                cpu[pid] = seconds
                role = _role(pid)  # each time: a child starts as a fork of its parent
                if role != "other" or pid not in roles:  # an exited one reads as "other"
                    roles[pid] = role
        time.sleep(0.1)
    _, err = proc.communicate()
    if proc.returncode not in (0, 1):
        sys.stderr.write(err.decode(errors="replace"))
        raise SystemExit(f"relay lab failed with exit code {proc.returncode}")
    by_role: dict[str, float] = defaultdict(float)
    for pid, seconds in cpu.items():
        by_role[roles[pid]] += seconds
    return {
        "seconds": round(time.perf_counter() - start, 2),
        "cpu_seconds": round(sum(cpu.values()), 2),
        "cpu_by_role": {k: round(v, 2) for k, v in sorted(by_role.items())},
        "load_average_1m": [round(load, 2), round(os.getloadavg()[0], 2)],
    }


def _compare(args: argparse.Namespace) -> dict[str, Any]:
    trees = dict(t.split("=", 1) for t in args.tree)
    regimes = [str(p) for p in _regime_files()]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, src in trees.items():
            out = Path(tempfile.mkdtemp(prefix=f"bench-pass1-{name}-"))
            cmd = [
                sys.executable, "-m", "relay.cli", "lab",
                "--corpus", str(args.corpus), "--labels", str(args.labels),
                "--config", str(REPO / "config" / "relay.toml"), "--no-cache",
                "--jobs", str(args.jobs), "--no-progress", "--inputs", str(REGIMES / "inputs"),
                "--out", str(out), "--policy", *regimes,
            ]  # fmt: skip
            env = {**os.environ, "PYTHONPATH": str(Path(src).resolve())}
            r = _run(cmd, env)
            report = json.loads((out / "report.json").read_text())
            n = report["corpus"]["readable"]
            r["messages"] = n
            r["cpu_ms_per_message"] = round(1000 * r["cpu_seconds"] / n, 2)
            r["timings"] = report["timings"]
            if args.keep:  # to compare the two trees' reports
                r["out"] = str(out)
            else:
                shutil.rmtree(out)
            runs[name].append(r)
            line = f"{name}: {r['cpu_seconds']} s CPU, {r['cpu_ms_per_message']} ms/msg"
            print(f"{line}, {r['seconds']} s wall, load {r['load_average_1m']}", file=sys.stderr)
    # Tree names only: their paths are this machine's (scratch copies), not results.
    return {"jobs": args.jobs, "trees": sorted(trees), "runs": runs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=("breakdown", "compare"))
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--labels", type=Path, required=True)
    parser.add_argument("-n", type=int, default=1500, help="breakdown: messages")
    parser.add_argument(
        "--children", action="store_true", help="breakdown: the children's CPU per fact"
    )
    parser.add_argument("--tree", action="append", default=[], help="compare: NAME=SRC")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="compare: keep the reports")
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args()
    result = asyncio.run(_breakdown(args)) if args.mode == "breakdown" else _compare(args)
    result["load_average"] = os.getloadavg()
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

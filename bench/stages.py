"""CPU per message by pipeline stage: where the relay's CPU goes, so the next bottleneck shows.

Method (docs/benchmarks.md, "CPU per stage"): one extra smtp-source phase, after the timed
rounds, on the relay variant with everything on, measured two ways at once:

1. exactly, per process: utime + stime of every process of the relay's tree before and
   after (``/proc/<pid>/stat``), each process given a role from its command line and
   parent: the supervisor, the SMTP workers, the classifier children, the DKIM/SPF
   verification child, the policy sandbox, multiprocessing's resource tracker. A child
   does one job, so its CPU is charged whole to that job's stage (pool -> classifier,
   verification child -> auth, sandbox -> policy);
2. sampled, inside the SMTP workers: py-spy (a sampling profiler that reads the
   interpreter's stacks from outside with ptrace, no change to the relay, counting only
   threads that are on a CPU) records stacks of the whole tree while the phase runs. Each
   worker sample goes to the stage of the innermost relay module on its stack (the stdlib
   or library code it called is charged to the relay code that called it: email parsing
   under ``relay/message.py`` is parse, aiosmtplib under ``relay/delivery`` is deliver),
   and a worker's exact CPU is split in proportion to its samples.

So the children's figures are exact and only the split of the workers' own CPU is an
estimate, whose sampling error is about sqrt(n)/n of each share (n samples). The time
clocks here are CPU clocks, not wall time: a stage waiting on DNS or on the downstream
costs nothing here (the wall-clock stage timings are the relay's ``relay_stage_duration_
seconds`` histograms and per-message log fields). Profiling perturbs a little (py-spy runs
on the same two cores, without pausing the target: ``--nonblocking``), which is why this is
a separate phase and the timed rounds are never profiled; the per-message figures are
scaled to the CPU per message of the profiled phase itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from bench.procstats import cmdline, parent_pid

# Stages in pipeline order, as the tables print them.
STAGES = (
    "receive",  # SMTP session in: aiosmtpd and relay/smtp (commands, DATA, limits)
    "parse",  # the lazy parse of the message (relay/message.py and the email package)
    "auth",  # SPF, DKIM, DMARC, ARC: relay/auth, the verification child, DNS cache
    "facts",  # the other facts: headers, bulk fingerprint, content, reputation ...
    "classifier",  # feature extraction + prediction (the pool) and its dispatch
    "policy",  # rule evaluation (CEL) and the verdict
    "stamp",  # Authentication-Results, X-Spam-* and Received fields
    "deliver",  # aiosmtplib to the downstream, relay/delivery
    "record",  # the recorder's writes of shared state
    "log",  # the per-message log line and other logging
    "metrics",  # prometheus_client observations, relay/ops
    "event loop",  # asyncio, selectors, sockets outside any relay frame
    "supervisor",  # the parent process (worker supervision, metrics files)
    "other",
)

# Innermost relay module on a stack -> stage; first matching prefix wins.
_RELAY_MODULES = (
    ("relay/message.py", "parse"),
    ("relay/pipeline/authresults.py", "stamp"),
    ("relay/pipeline/actions.py", "stamp"),
    ("relay/pipeline/recorder.py", "record"),
    ("relay/state.py", "record"),
    ("relay/feedback/", "record"),
    ("relay/facts/auth.py", "auth"),
    ("relay/auth/", "auth"),
    ("relay/dns.py", "auth"),
    ("relay/facts/classifier.py", "classifier"),
    ("relay/classifier/", "classifier"),
    ("relay/models/", "classifier"),
    ("relay/policy/", "policy"),
    ("relay/proc/celsandbox.py", "policy"),
    ("relay/verdict.py", "policy"),
    ("relay/facts/", "facts"),
    ("relay/delivery/", "deliver"),
    ("relay/smtp/", "receive"),
    ("relay/ops/", "metrics"),
)
# Plumbing that serves whoever called it: look further out for the stage. The second item
# is the stage when nothing further out says (the pipes' own callbacks run straight from the
# event loop; in the profiled configuration the verification child is the only process fed
# over them, which the role table confirms: no "policy sandbox" row).
_TRANSPARENT = {
    "relay/proc/pipes.py": "auth",
    "relay/proc/lifetime.py": "other",
    "relay/reply.py": "other",
    "relay/app.py": "other",  # worker_main: asyncio.run of the whole worker
    # the worker's entry (python -m relay.launch; before, launch.worker_entry under
    # multiprocessing): on every worker stack, so were it a stage, every sample without a
    # stage-naming relay frame (event loop, aiosmtpd reading, pipe writes) would be "other"
    "relay/launch.py": "other",
    "relay/cli/": "other",
}
# Functions of relay/pipeline/process.py that are a stage of their own.
_PROCESS_FUNCTIONS = {"received": "stamp", "_log_report": "log"}
# Library code reached without a relay frame nearer the leaf (or called for logging or
# metrics from anywhere: that cost is logging's or metrics', not the caller's stage).
_LIBRARIES = (
    ("logging/", "log"),
    ("prometheus_client/", "metrics"),
    # A worker's only process pool is the classifier's: its feeder thread pickles and
    # writes the batches, its result thread reads the answers.
    ("concurrent/futures/process.py", "classifier"),
    ("multiprocessing/queues.py", "classifier"),
    ("multiprocessing/connection.py", "classifier"),
    ("aiosmtpd/", "receive"),
    ("aiosmtplib/", "deliver"),
    ("asyncio/", "event loop"),
    ("selectors.py", "event loop"),
    ("socket.py", "event loop"),
    ("ssl.py", "event loop"),
)
# Leaf frames that are blocking waits: an idle pool thread parked in its queue's get (the
# relay's facts hand CPU work to threads with asyncio.to_thread), a condition wait. py-spy
# still reports some of them on a CPU (a thread woken for the next item, waiting to take
# the GIL); they are not the relay's work, so they are left out of the split and counted.
WAITING = "waiting"
_WAITS = (
    ("concurrent/futures/thread.py", "_worker"),
    ("threading.py", "wait"),
    ("threading.py", "Condition.wait"),
    ("threading.py", "Event.wait"),
    ("threading.py", "Thread._wait_for_tstate_lock"),
    ("queue.py", "Queue.get"),
)
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<path>[^()]*?):\d+\)$")
_PROCESS = re.compile(r"^process (\d+):")

# Roles of the processes of a relay tree; children are charged whole to one stage.
ROLE_STAGE = {
    "classifier child": "classifier",
    # classifies and verifies (relay/analysis.py); verification is its smaller share
    "analysis child": "classifier",
    "verification child": "auth",
    "policy sandbox": "policy",
    "supervisor": "supervisor",
    "resource tracker": "other",
    "other process": "other",
}


def _module(path: str) -> str:
    """``.../src/relay/auth/spf.py`` or ``relay/auth/spf.py`` -> ``relay/auth/spf.py``;
    anything else is kept as py-spy wrote it, with a leading slash (``/asyncio/events.py``,
    ``/usr/lib/python3.11/asyncio/events.py``) so library names match on whole parts."""
    at = path.rfind("relay/")
    if at >= 0 and (at == 0 or path[at - 1] == "/"):
        return path[at:]
    return path if path.startswith("/") else "/" + path


def _library(module: str, pattern: str) -> bool:
    return ("/" + pattern) in module


def stage_of_stack(frames: list[str]) -> str:
    """The stage of one sampled stack (frames from the outermost to the leaf)."""
    parsed = []
    for frame in frames:
        m = _FRAME.match(frame)
        if m is not None:
            parsed.append((m["func"], _module(m["path"])))
    if parsed:
        leaf_func, leaf_module = parsed[-1]
        if any(leaf_module.endswith("/" + m) and leaf_func == f for m, f in _WAITS):
            return WAITING
    fallback = ""
    for func, module in reversed(parsed):  # from the leaf outwards
        for pattern, stage in _LIBRARIES[:2]:  # logging / metrics wherever they are called
            if _library(module, pattern):
                return stage
        if not module.startswith("relay/"):
            continue
        plumbing = next((v for k, v in _TRANSPARENT.items() if module.startswith(k)), None)
        if plumbing is not None:
            fallback = fallback or (plumbing if plumbing != "other" else "")
            continue
        if module == "relay/pipeline/process.py":
            return _PROCESS_FUNCTIONS.get(func.rsplit(".", 1)[-1], "other")
        for prefix, stage in _RELAY_MODULES:
            if module.startswith(prefix):
                return stage
        return "other"
    if fallback:
        return fallback
    # No relay frame: the innermost library that names a job (aiosmtpd reading a session,
    # the pool's feeder thread) wins over the bare event loop and sockets it runs on.
    for generic in (False, True):
        for _, module in reversed(parsed):
            for pattern, stage in _LIBRARIES:
                if (stage == "event loop") == generic and _library(module, pattern):
                    return stage
    return "other"


def parse_raw(text: str) -> Counter[tuple[int, str]]:
    """py-spy ``--format raw`` (collapsed stacks: ``process A;process B;frame;... count``)
    -> samples per (sampled process id, stage)."""
    out: Counter[tuple[int, str]] = Counter()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        pid = 0
        rest: list[str] = []
        for frame in frames:
            m = _PROCESS.match(frame)
            if m is not None:
                pid = int(m.group(1))
            else:
                rest.append(frame)
        out[(pid, stage_of_stack(rest))] += int(count)
    return out


def unattributed(text: str, top: int = 6) -> list[tuple[str, int]]:
    """The innermost frames of the samples that fell to "other": what the stage table does
    not name yet, printed so the mapping can be refined rather than trusted blindly."""
    leaves: Counter[str] = Counter()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [f for f in stack.split(";") if not _PROCESS.match(f)]
        if stage_of_stack(frames) in ("other", WAITING):
            named = [f for f in frames if "relay/" in f] or frames
            leaves[f"{named[-1]} .. {frames[-1]}" if frames else "(no frame)"] += int(count)
    return leaves.most_common(top)


def _hot_key(frames: list[str]) -> str:
    """``function (relay module) > leaf library module``: the relay code that asked for the
    work and the library file the CPU was in (``extract (relay/classifier/features.py) >
    sklearn/feature_extraction/text.py``)."""
    parsed = [(m["func"], _module(m["path"])) for f in frames if (m := _FRAME.match(f))]
    if not parsed:
        return "(no frame)"
    relay = next(((f, m) for f, m in reversed(parsed) if m.startswith("relay/")), None)
    leaf = parsed[-1][1].lstrip("/")
    leaf = "/".join(leaf.split("/")[-3:])
    if relay is None:
        return leaf
    head = f"{relay[0].rsplit('.', 1)[-1]} ({relay[1]})"
    return head if parsed[-1][1] == relay[1] else f"{head} > {leaf}"


def hotspots(
    text: str,
    cpu: Mapping[int, float],
    roles: Mapping[int, str],
    messages: int,
    wanted: tuple[str, ...] = ("smtp worker", "classifier child", "analysis child"),
    top: int = 8,
) -> dict[str, list[tuple[str, float]]]:
    """Per role, the hottest ``_hot_key`` places in CPU ms per message: each process's exact
    CPU split by its samples (blocking waits left out), summed over the role's processes."""
    by_pid: dict[int, Counter[str]] = {}
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        pid, frames = 0, []
        for frame in stack.split(";"):
            m = _PROCESS.match(frame)
            if m is not None:
                pid = int(m.group(1))
            else:
                frames.append(frame)
        if roles.get(pid) not in wanted or stage_of_stack(frames) == WAITING:
            continue
        by_pid.setdefault(pid, Counter())[_hot_key(frames)] += int(count)
    scale = 1000.0 / messages if messages else 0.0
    out: dict[str, list[tuple[str, float]]] = {}
    for r in wanted:
        ms: defaultdict[str, float] = defaultdict(float)
        for pid, keys in by_pid.items():
            total = sum(keys.values())
            if roles.get(pid) != r or not total:
                continue
            for key, n in keys.items():
                ms[key] += cpu.get(pid, 0.0) * n / total * scale
        ranked = sorted(ms.items(), key=lambda kv: -kv[1])[:top]
        out[r] = [(k, round(v, 3)) for k, v in ranked]
    return out


def role(pid: int, root: int, workers: set[int]) -> str:
    """What a process of the relay's tree is, from its command line and parent."""
    if pid == root:
        return "supervisor"
    if pid in workers:
        return "smtp worker"
    line = cmdline(pid)
    if "resource_tracker" in line:
        return "resource tracker"
    if "relay.auth.cryptoproc" in line:
        return "verification child"
    if "relay.proc.celsandbox" in line:
        return "policy sandbox"
    if "relay.analysis" in line:
        return "analysis child"
    if "relay.classifier.child" in line:
        return "classifier child"
    if "spawn_main" in line and parent_pid(pid) in workers:
        return "classifier child"  # a baseline's pool: the only process pool a worker spawns
    return "other process"


@dataclass(frozen=True, slots=True)
class StageCpu:
    messages: int
    cpu_ms_per_msg: float  # whole tree, this phase
    stages: dict[str, float]  # stage -> CPU ms per message
    roles: dict[str, float]  # process role -> CPU ms per message (exact)
    worker_samples: int
    sampled: bool  # False: py-spy missing or failed; worker CPU left as "receive..other"
    waiting_samples: int = 0  # worker samples in blocking waits, left out of the split
    note: str = ""

    def as_dict(self) -> dict[str, object]:
        return {
            "messages": self.messages,
            "cpu_ms_per_msg": round(self.cpu_ms_per_msg, 3),
            "stages_ms_per_msg": {k: round(v, 3) for k, v in self.stages.items()},
            "roles_ms_per_msg": {k: round(v, 3) for k, v in self.roles.items()},
            "worker_samples": self.worker_samples,
            "waiting_samples_left_out": self.waiting_samples,
            "sampled": self.sampled,
            "note": self.note,
        }


def attribute(
    cpu: Mapping[int, float],
    roles: Mapping[int, str],
    samples: Mapping[tuple[int, str], int],
    messages: int,
) -> StageCpu:
    """Combine exact per-process CPU (seconds) with the workers' sampled stage shares."""
    per_stage: defaultdict[str, float] = defaultdict(float)
    per_role: defaultdict[str, float] = defaultdict(float)
    worker_samples = 0
    waiting = 0
    unsampled = 0.0
    for pid, seconds in cpu.items():
        r = roles.get(pid, "other process")
        per_role[r] += seconds
        if r != "smtp worker":
            per_stage[ROLE_STAGE.get(r, "other")] += seconds
            continue
        mine = {stage: n for (p, stage), n in samples.items() if p == pid}
        waiting += mine.pop(WAITING, 0)
        total = sum(mine.values())
        worker_samples += total
        if total == 0:
            unsampled += seconds
            continue
        for stage, n in mine.items():
            per_stage[stage] += seconds * n / total
    if unsampled:
        per_stage["worker, not sampled"] += unsampled
    scale = 1000.0 / messages if messages else 0.0
    ordered = [s for s in STAGES if per_stage.get(s)] + [
        s for s in per_stage if s not in STAGES and per_stage[s]
    ]
    return StageCpu(
        messages=messages,
        cpu_ms_per_msg=sum(cpu.values()) * scale,
        stages={s: per_stage[s] * scale for s in ordered},
        roles={r: v * scale for r, v in sorted(per_role.items(), key=lambda kv: -kv[1])},
        worker_samples=worker_samples,
        sampled=worker_samples > 0,
        waiting_samples=waiting,
    )


def find_py_spy() -> str | None:
    """py-spy next to this interpreter (pip installs it into the venv), else on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.is_file() else shutil.which("py-spy")


class Sampler:
    """py-spy recording a process tree until ``stop``; raw collapsed stacks in ``out``."""

    def __init__(self, root: int, out: Path, rate: int = 100, blocking: bool = True) -> None:
        self.out = out
        self.proc: subprocess.Popen[bytes] | None = None
        self.error = ""
        binary = find_py_spy()
        if binary is None:
            self.error = "py-spy not installed (make bench installs it into the venv)"
            return
        argv = [binary, "record", "--pid", str(root), "--subprocesses"]
        argv += ["--rate", str(rate), "--format", "raw", "--output", str(out)]
        if not blocking:
            argv.append("--nonblocking")
        self._log = out.with_suffix(".log")
        with self._log.open("wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

    async def started(self) -> None:
        """py-spy needs a moment to attach to every process before the load begins."""
        await asyncio.sleep(1.5)
        if self.proc is not None and self.proc.poll() is not None:
            self.error = f"py-spy exited: {self._tail()}"

    def stop(self) -> str:
        """SIGINT (py-spy writes its output on it); returns the raw stacks ("" on failure)."""
        if self.proc is None:
            return ""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.error = "py-spy did not stop within 30 s"
        with contextlib.suppress(OSError):
            return self.out.read_text(errors="replace")
        if not self.error:
            self.error = f"py-spy wrote nothing: {self._tail()}"
        return ""

    def _tail(self) -> str:
        with contextlib.suppress(OSError):
            return " ".join(self._log.read_text(errors="replace").split()[-30:])
        return ""

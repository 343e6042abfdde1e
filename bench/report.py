"""Results -> ratios, the pass/fail checks, and bench/results/throughput.md."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from bench.scenarios import Comparison

Row = Mapping[str, Any]


def _rate(row: Row | None, phase: str) -> float | None:
    if row is None or "skipped" in row or phase not in row:
        return None
    value = row[phase].get("msgs_per_s")
    return float(value) if value else None


def _cpu(row: Row | None) -> float | None:
    if row is None or "source" not in row:
        return None
    value = row["source"].get("server_cpu_ms_per_msg")
    return float(value) if value else None


def ratios(rows: Sequence[Row], wanted: Sequence[Comparison]) -> list[dict[str, Any]]:
    by_key = {row["key"]: row for row in rows}
    out = []
    for c in wanted:
        num, den = by_key.get(c.numerator), by_key.get(c.denominator)
        item: dict[str, Any] = {
            "title": c.title,
            "numerator": c.numerator,
            "denominator": c.denominator,
            "target": c.target,
            "asked_by": c.source,
        }
        missing = [
            f"{key}: {row['skipped'] if row and 'skipped' in row else 'not run'}"
            for key, row in ((c.numerator, num), (c.denominator, den))
            if _rate(row, "source") is None
        ]
        if missing:
            item["skipped"] = "; ".join(missing)
            out.append(item)
            continue
        for phase in ("source", "client"):
            a, b = _rate(num, phase), _rate(den, phase)
            item[f"ratio_{phase}"] = round(a / b, 3) if a is not None and b else None
        # Messages per CPU-second, numerator over denominator: what the ratio would be if
        # each had the CPU to itself (robust when other jobs crowd the machine).
        cost_num, cost_den = _cpu(num), _cpu(den)
        item["ratio_cpu"] = round(cost_den / cost_num, 3) if cost_num and cost_den else None
        if c.target is not None:
            item["pass"] = item["ratio_source"] >= c.target
            if item["ratio_cpu"] is not None:
                item["pass_cpu"] = item["ratio_cpu"] >= c.target
        out.append(item)
    return out


def session_checks(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Every server held the high-concurrency run: all sessions open, no error, no loss."""
    out = []
    for row in rows:
        high = row.get("client_high")
        if high is None:
            continue
        errors = sum(high["errors"].values())
        out.append(
            {
                "key": row["key"],
                "sessions": high["sessions"],
                "peak_open_sessions": high["peak_open_sessions"],
                "errors": errors,
                "pass": errors == 0 and high["peak_open_sessions"] == high["sessions"],
            }
        )
    return out


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _verdict(item: Mapping[str, Any]) -> str:
    if "pass" not in item:
        return ""
    text = "**pass**" if item["pass"] else "**FAIL**"
    if "pass_cpu" in item:
        text += " (per CPU-second: " + ("pass" if item["pass_cpu"] else "FAIL") + ")"
    return text


# The anchors' bar for the relay with everything on (shared/anchors.md, issue 17).
CPU_TARGET_MS = 2.5
MEMORY_TARGET_MIB = 300
LOOP_LAG_TARGET_MS = 5.0  # issue 17: event-loop lag p99 under the everything-on load


def _summary_keys(results: Mapping[str, Any]) -> list[str]:
    """The rows the README quotes: the baselines, the relay's main steps, Rspamd."""
    top = max(results["meta"]["options"]["workers"])
    return [
        "direct",
        "passthrough-pooled",
        f"relay-noop-w{top}",
        f"relay-auth-w{top}",
        "relay-classifier-w1",
        f"relay-full-w{top}",
        "rspamd-scan",
        "rspamd-bayes",
    ]


def _lag(row: Row) -> str:
    lag = row.get("loop_lag")
    return _fmt(lag.get("p99_ms"), 1) if lag and lag.get("samples") else "-"


def _memory(row: Row) -> str:
    s = row["source"]
    return f"{_fmt(s['server_peak_rss_mb'], 0)} / {_fmt(s.get('server_peak_pss_mb'), 0)}"


def stage_line(row: Row) -> str:
    st = row.get("stage_cpu")
    if not st:
        return ""
    parts = ", ".join(f"{k} {v:.2f}" for k, v in st["stages_ms_per_msg"].items() if v >= 0.005)
    return f"CPU ms per message by stage ({row['key']}, profiled phase): {parts}"


def summary(results: Mapping[str, Any]) -> str:
    """The block the README quotes: a few lines with the headline figures and ratios."""
    meta = results["meta"]
    rows = {row["key"]: row for row in results["scenarios"]}
    opts = meta["options"]
    lines = [
        f"Throughput on {meta['cores']} cores ({meta['started_utc']}, commit {meta['commit']}): "
        f"{meta['message_bytes']}-byte DKIM-signed messages; SMTP servers loaded by "
        f"smtp-source ({opts['sessions']} sessions, a new connection per message), Rspamd by "
        f"HTTP /checkv2 ({opts['in_flight']} in flight); median of {opts['rounds']} "
        "interleaved rounds. Memory: peak of the whole process tree; loop lag: p99 of an "
        "SMTP NOOP (Rspamd: HTTP /ping) round trip under that load.",
        "",
        "| path | msgs/s | vs pass-through | CPU ms/msg | peak RSS / PSS MiB | loop lag p99 ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    base = _rate(rows.get("passthrough-pooled"), "source")
    for key in _summary_keys(results):
        row = rows.get(key)
        rate = _rate(row, "source")
        if row is None:
            continue
        if rate is None:
            if "skipped" in row:
                lines.append(f"| {row['title']} | skipped: {row['skipped'][:160]} | | | | |")
            continue
        ratio = f"{rate / base:.2f}x" if base else "-"
        cpu = _fmt(row["source"]["server_cpu_ms_per_msg"], 2)
        lines.append(
            f"| {row['title']} | {rate:,.0f} | {ratio} | {cpu} | {_memory(row)} | {_lag(row)} |"
        )
    lines.append("")
    load = meta["load_average_before"][0], meta["load_average_after"][0]
    lines.append(
        f"Load average {load[0]:.1f} before, {load[1]:.1f} after, on a machine shared with "
        "other jobs: absolute figures move between runs, same-run ratios are what count."
    )
    lines.append("")
    for item in results["comparisons"]:
        if item.get("target") is None:
            continue
        if "skipped" in item:
            reasons = [r for r in item["skipped"].split("; ") if not r.endswith(": not run")]
            if reasons:  # a side that was not chosen (--only) is no finding; a skip is
                lines.append(f"- {item['title']}: not measured ({'; '.join(reasons)[:200]})")
        else:
            cpu = item.get("ratio_cpu")
            per_cpu = f", {cpu:.2f}x per CPU-second" if cpu else ""
            lines.append(
                f"- {item['title']}: {item['ratio_source']:.2f}x msgs/s{per_cpu} "
                f"(target >= {item['target']}) {_verdict(item)}"
            )
    top = max(opts["workers"])
    full = rows.get(f"relay-full-w{top}")
    if full is not None and "source" in full:
        src = full["source"]
        cpu_ok = src["server_cpu_ms_per_msg"] <= CPU_TARGET_MS
        pss = src.get("server_peak_pss_mb") or 0.0
        lines.append(
            f"- everything on: {src['server_cpu_ms_per_msg']:.2f} ms CPU per message "
            f"(target <= {CPU_TARGET_MS}) **{'pass' if cpu_ok else 'FAIL'}**; whole tree peak "
            f"{pss:,.0f} MiB PSS, {src['server_peak_rss_mb']:,.0f} MiB RSS (target <= "
            f"{MEMORY_TARGET_MIB} MiB) **{'pass' if pss <= MEMORY_TARGET_MIB else 'FAIL'}**"
        )
        inside = full.get("loop_lag_in_relay") or {}
        if inside.get("samples") and inside.get("p99_le_ms") is not None:
            p99 = inside["p99_le_ms"]
            lines.append(
                f"- everything on: event-loop lag p99 <= {p99:g} ms inside the relay "
                f"(`relay_event_loop_lag_seconds`, {inside['samples']:,} samples; target <= "
                f"{LOOP_LAG_TARGET_MS:g}) **{'pass' if p99 <= LOOP_LAG_TARGET_MS else 'FAIL'}**"
            )
        line = stage_line(full)
        if line:
            lines.append(f"- {line}")
    checks = results.get("checks", [])
    if checks:
        held = [c for c in checks if c["key"].startswith("relay")]
        failed = [c["key"] for c in held if not c["pass"]]
        sessions = held[0]["sessions"] if held else 0
        lines.append(
            f"- {sessions} concurrent sessions held by every relay variant without errors: "
            + ("**pass**" if held and not failed else f"**FAIL** ({', '.join(failed)})")
        )
    return "\n".join(lines) + "\n"


def markdown(results: Mapping[str, Any]) -> str:
    meta = results["meta"]
    out = [
        "# Relay throughput",
        "",
        "Written by `make bench` (`python -m bench.run`); method in docs/benchmarks.md. "
        "Compare ratios from one run, not absolute figures across runs.",
        "",
        "<!-- summary for README: start -->",
        summary(results).rstrip(),
        "<!-- summary for README: end -->",
        "",
        "## Throughput (smtp-source, a new connection per message; Rspamd: HTTP scans)",
        "",
        "| scenario | workers | msgs/s (median) | rounds | server CPU ms/msg | "
        "server CPU cores | peak RSS MiB | peak PSS MiB | errors |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in results["scenarios"]:
        if "source" not in row:
            continue
        s = row["source"]
        rounds = ", ".join(_fmt(r["msgs_per_s"]) for r in s["rounds"])
        cores = max(r["server_cpu_cores"] for r in s["rounds"])
        out.append(
            f"| {row['key']} | {row.get('smtp_processes', row['workers'])} | "
            f"{_fmt(float(s['msgs_per_s']))} | {rounds} | {_fmt(s['server_cpu_ms_per_msg'], 2)} "
            f"| {_fmt(cores, 2)} | {_fmt(s['server_peak_rss_mb'], 1)} "
            f"| {_fmt(s.get('server_peak_pss_mb'), 1)} | {s['errors']} |"
        )
    out += [
        "",
        "## Ratios (same run)",
        "",
        "msgs/s ratios from smtp-source (the judged one) and from the asyncio client; the CPU "
        "ratio compares server CPU per message (msgs per CPU-second), which other jobs on the "
        "machine disturb less.",
        "",
        "| comparison | smtp-source ratio | client ratio | CPU ratio | target | result |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for item in results["comparisons"]:
        target = _fmt(item.get("target"), 2)
        if "skipped" in item:
            out.append(f"| {item['title']} | - | - | - | {target} | skipped: {item['skipped']} |")
            continue
        out.append(
            f"| {item['title']} | {_fmt(item['ratio_source'], 3)} | "
            f"{_fmt(item['ratio_client'], 3)} | {_fmt(item['ratio_cpu'], 3)} | {target} | "
            f"{_verdict(item)} |"
        )
    for label, title in (
        ("client", "Latency, asyncio client, a new connection per message (connect .. 250)"),
        ("client_high", "High concurrency, every session open at once (MAIL .. 250)"),
    ):
        out += [
            "",
            f"## {title}",
            "",
            "| scenario | sessions | peak open | msgs/s | p50 ms | p99 ms | max ms | "
            "server CPU ms/msg | peak RSS MB | errors |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for row in results["scenarios"]:
            c = row.get(label)
            if c is None:
                continue
            errors = ", ".join(f"{k}: {v}" for k, v in c["errors"].items()) or "0"
            out.append(
                f"| {row['key']} | {c['sessions']} | {c['peak_open_sessions']} | "
                f"{_fmt(c['msgs_per_s'])} | {_fmt(c['p50_ms'], 1)} | {_fmt(c['p99_ms'], 1)} | "
                f"{_fmt(c['max_ms'], 1)} | {_fmt(c['server_cpu_ms_per_msg'], 2)} | "
                f"{_fmt(c['server_peak_rss_mb'], 1)} | {errors} |"
            )
    probed = [row for row in results["scenarios"] if row.get("loop_lag")]
    if probed:
        out += [
            "",
            "## Event-loop lag, seen from outside (during the timed rounds)",
            "",
            "Seen from outside, 4 connections per server send an SMTP "
            "NOOP every "
            f"{meta['options'].get('probe_interval', 0.2):g} s while smtp-source loads it "
            "(Rspamd: HTTP GET /ping during its scans): the round trip is how long the "
            "server's event loop, and the OS scheduler on the shared cores, kept the probe "
            "waiting.",
            "",
            "| scenario | probe | samples | p50 ms | p99 ms | max ms | failures |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
        for row in probed:
            lag = row["loop_lag"]
            failures = ", ".join(f"{k}: {v}" for k, v in lag["failures"].items()) or "0"
            out.append(
                f"| {row['key']} | {lag['probe']} | {lag['samples']} | {_fmt(lag['p50_ms'], 2)} "
                f"| {_fmt(lag['p99_ms'], 2)} | {_fmt(lag['max_ms'], 2)} | {failures} |"
            )
    inside = [
        row for row in results["scenarios"] if (row.get("loop_lag_in_relay") or {}).get("samples")
    ]
    if inside:
        out += [
            "",
            "From inside the relay (`relay_event_loop_lag_seconds`: how late a timer due every "
            "0.25 s fired in each worker, the buckets gained during the timed rounds; a "
            "percentile is known to the upper bound of its bucket):",
            "",
            "| scenario | samples | p50 <= ms | p99 <= ms | max <= ms |",
            "|---|---:|---:|---:|---:|",
        ]
        for row in inside:
            lag = row["loop_lag_in_relay"]
            out.append(
                f"| {row['key']} | {lag['samples']} | {_fmt(lag['p50_le_ms'], 1)} "
                f"| {_fmt(lag['p99_le_ms'], 1)} | {_fmt(lag['max_le_ms'], 1)} |"
            )
    ticker = [
        (row["key"], row["server_stats"])
        for row in results["scenarios"]
        if "loop_lag_max_ms" in row.get("server_stats", {})
    ]
    if ticker:
        out += ["", "The pass-through's own 10 ms ticker over its whole run:", ""]
        out += [
            f"- {key}: max {s['loop_lag_max_ms']:.1f} ms, p99 {s['loop_lag_p99_ms']:.1f} ms"
            for key, s in ticker
        ]
    out += stage_section(results)
    out += rspamd_section(results)
    unclean = [
        (row["key"], row["server_stats"])
        for row in results["scenarios"]
        if "killed" in row.get("server_stats", {}).get("exit", "")
        or "left_behind" in row.get("server_stats", {})
    ]
    if unclean:
        out += ["", "## Servers that did not shut down cleanly", ""]
        out += [
            f"- {key}: {s['exit']}"
            + (f", {s['left_behind']} child process(es) left behind" if "left_behind" in s else "")
            for key, s in unclean
        ]
    skipped = [row for row in results["scenarios"] if "skipped" in row]
    if skipped:
        out += ["", "## Skipped variants", ""]
        out += [f"- {row['key']}: {row['skipped']}" for row in skipped]
    out += ["", "## Run", ""]
    opts = meta["options"]
    out.append(
        f"- {meta['started_utc']}, commit {meta['commit']}, {meta['cores']} cores, "
        f"Python {meta['python']}, took {meta['duration_s']} s"
    )
    out.append(
        f"- load average before {meta['load_average_before'][0]:.2f}, after "
        f"{meta['load_average_after'][0]:.2f} (other work on the machine adds noise)"
    )
    out.append(
        f"- {opts['messages']} messages per phase (fewer for slow variants, capped at "
        f"~{opts['max_phase_seconds']:.0f} s per phase), {opts['sessions']} sessions, "
        f"high run {opts['high_sessions']} sessions, {opts['rounds']} rounds, "
        f"{opts['warmup']} warm-up messages"
    )
    out += [f"- {note}" for note in meta["notes"]]
    return "\n".join(out) + "\n"


def stage_section(results: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    for row in results["scenarios"]:
        st = row.get("stage_cpu")
        if not st:
            continue
        total = st["cpu_ms_per_msg"] or 1.0
        out += [
            "",
            f"## CPU per message by stage ({row['key']}, one profiled phase)",
            "",
            f"{st['messages']} messages at {st['msgs_per_s_while_profiled']} msgs/s while "
            f"py-spy sampled the tree ({st['worker_samples']} samples in the SMTP workers, "
            f"{st.get('waiting_samples_left_out', 0)} more in blocking waits left out); "
            f"{st['cpu_ms_per_msg']:.2f} ms CPU per message in all. Child processes are "
            "measured exactly (/proc) and charged whole to their stage; the SMTP workers' "
            "own CPU is split by where their samples fell (bench/stages.py).",
            "",
            "| stage | CPU ms/msg | share |",
            "|---|---:|---:|",
        ]
        out += [
            f"| {stage} | {ms:.3f} | {100 * ms / total:.0f}% |"
            for stage, ms in st["stages_ms_per_msg"].items()
        ]
        out += ["", "| process role | CPU ms/msg (exact) |", "|---|---:|"]
        out += [f"| {r} | {ms:.3f} |" for r, ms in st["roles_ms_per_msg"].items()]
        for r, places in st.get("hotspots_ms_per_msg", {}).items():
            if not places:
                continue
            out += [
                "",
                f"Hottest places in the {r} processes (sampled; the relay function that asked "
                "> the library file the CPU was in):",
                "",
                "| where | CPU ms/msg |",
                "|---|---:|",
            ]
            out += [f"| `{where}` | {ms:.3f} |" for where, ms in places]
        if st.get("note"):
            out += ["", f"Note: {st['note']}"]
    return out


def rspamd_section(results: Mapping[str, Any]) -> list[str]:
    info = results["meta"].get("rspamd") or {}
    if not info:
        return []
    out = ["", "## Rspamd set-up", ""]
    if "skipped" in info:
        out.append(f"- skipped: {info['skipped']}")
    if info.get("version"):
        out.append(
            f"- {info['version']}, private config (bench/rspamd.py): 2 normal workers, "
            "controller, no proxy, Bayes in a private Redis on loopback, network modules off"
        )
    train = info.get("train")
    if train:
        out.append(
            f"- Bayes trained in {train['elapsed_s']} s on {train['corpus']}: learnt "
            f"{train['learned']} (replies {train['replies']}; 204/208: Rspamd's learn "
            "condition declined a message its Bayes already put in that class)"
        )
    for row in results["scenarios"]:
        if row.get("kind") == "rspamd" and row.get("bayes_symbols") is not None:
            out.append(
                f"- {row['key']}: Bayes symbols on the bench message {row['bayes_symbols']}, "
                f"actions {row.get('rspamd_actions', {})}"
            )
    if info.get("stop"):
        out.append(f"- shutdown: {info['stop']}")
    return out

"""decide() cost: a 30-rule policy over T0/T1 facts, facts preset (target < 100 us/message).

    .venv/bin/python -m bench.bench_policy            # writes bench/results/policy.{json,md}
    .venv/bin/python -m bench.bench_policy --quick

Scenarios (each the median of several repeats, one event loop, no I/O):
- full:   no rule settles the outcome early, so all 30 rules are evaluated;
- stop:   a forced reject in the first T1 rules ends evaluation (early stop);
- facts+decide: a fresh preset Facts object per message plus decide (what the lab pays).
It also times loading the policy, and one condition in CEL and in rule-engine (when that
package is installed), the measurement behind the choice of CEL (docs/policy.md).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

from relay.celext import cel
from relay.facts.base import FactContext, FactRegistry, Facts, FactSpec, FactType, Services
from relay.message import Message
from relay.policy import Policy, compile_policy
from relay.verdict import Tier

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_US = 100.0

FACTS: dict[str, tuple[FactType, Tier, Any]] = {
    "client_ip": (FactType.STR, Tier.CONNECTION, "192.0.2.10"),
    "helo": (FactType.STR, Tier.CONNECTION, "mail.sender.test"),
    "tls_used": (FactType.BOOL, Tier.CONNECTION, True),
    "fcrdns_ok": (FactType.BOOL, Tier.CONNECTION, True),
    "recipient_count": (FactType.INT, Tier.ENVELOPE, 3),
    "message_size": (FactType.INT, Tier.ENVELOPE, 24_000),
    "null_sender": (FactType.BOOL, Tier.ENVELOPE, False),
    "mail_from_domain": (FactType.STR, Tier.ENVELOPE, "sender.test"),
    "from_domain": (FactType.STR, Tier.ENVELOPE, "sender.test"),
    "reply_to_domain": (FactType.STR, Tier.ENVELOPE, ""),
    "spf": (FactType.STR, Tier.ENVELOPE, "pass"),
    "dkim_result": (FactType.STR, Tier.ENVELOPE, "pass"),
    "dmarc": (FactType.STR, Tier.ENVELOPE, "pass"),
    "dmarc_policy": (FactType.STR, Tier.ENVELOPE, "reject"),
    "dmarc_aligned": (FactType.BOOL, Tier.ENVELOPE, True),
    "arc": (FactType.STR, Tier.ENVELOPE, "none"),
    "dkim_domains_pass": (FactType.STR_LIST, Tier.ENVELOPE, ["sender.test"]),
    "list_id": (FactType.STR, Tier.ENVELOPE, "news.sender.test"),
    "precedence": (FactType.STR, Tier.ENVELOPE, "bulk"),
    "has_list_unsubscribe": (FactType.BOOL, Tier.ENVELOPE, True),
    "has_one_click_unsubscribe": (FactType.BOOL, Tier.ENVELOPE, True),
    "subject_ad_label": (FactType.BOOL, Tier.ENVELOPE, False),
    "from_display_spoof": (FactType.BOOL, Tier.ENVELOPE, False),
    "fake_reply_subject": (FactType.BOOL, Tier.ENVELOPE, False),
    "rfc5322_errors": (FactType.STR_LIST, Tier.ENVELOPE, []),
}

RULES = [
    ("no_tls", "!tls_used", 1.0),
    ("no_fcrdns", "!fcrdns_ok", 2.0),
    ("helo_is_ip", 'helo.matches("^\\\\[?[0-9.]+\\\\]?$")', 2.0),
    ("helo_localhost", 'helo == "localhost"', 3.0),
    ("many_rcpts", "recipient_count > 20", 3.0),
    ("huge", "message_size > 10000000", 1.0),
    ("bounce", "null_sender && recipient_count > 1", 2.0),
    ("spf_fail", 'spf == "fail"', 3.0),
    ("spf_softfail", 'spf == "softfail"', 1.0),
    ("spf_error", 'spf in ["temperror", "permerror"]', 0.5),
    ("dkim_fail", 'dkim_result == "fail"', 1.0),
    ("unauthenticated", 'spf != "pass" && dkim_result != "pass"', 2.0),
    ("dmarc_quarantine", 'dmarc == "fail" && dmarc_policy == "quarantine"', 6.0),
    ("dmarc_none_fail", 'dmarc == "fail" && dmarc_policy == "none"', 2.0),
    ("not_aligned", "!dmarc_aligned", 1.5),
    ("arc_fail", 'arc == "fail"', 1.0),
    ("dmarc_pass", 'dmarc == "pass"', -1.0),
    ("signed_by_from", "from_domain in dkim_domains_pass", -0.5),
    ("reply_elsewhere", 'reply_to_domain != "" && reply_to_domain != from_domain', 1.0),
    ("bulk_no_unsub", 'precedence == "bulk" && !has_list_unsubscribe', 2.0),
    ("list_no_one_click", 'list_id != "" && !has_one_click_unsubscribe', 1.0),
    ("ad_label", "subject_ad_label", 0.5),
    ("display_spoof", "from_display_spoof", 3.0),
    ("fake_reply", "fake_reply_subject", 2.0),
    ("rfc5322", "rfc5322_errors.size() > 0", 1.0),
    ("rfc5322_many", "rfc5322_errors.size() > 2", 2.0),
    ("envelope_mismatch", "mail_from_domain != from_domain && !dmarc_aligned", 1.0),
    ("list_mail", 'list_id != "" || precedence in ["bulk", "list"]', 0.5),
    ("one_click_ok", "has_one_click_unsubscribe && dmarc_aligned", -0.5),
    # last and heavy, so no earlier point can settle the outcome: all 30 rules run
    ("freemail_bulk", 'mail_from_domain.endsWith(".invalid") && recipient_count > 5', 7.0),
]


def policy_text(first_rule: str = "") -> str:
    parts = [
        '[policy]\nname = "bench30"\n',
        "[policy.thresholds]\ntag = 5\nquarantine = 10\nreject = 15\n",
        first_rule,
    ]
    for name, when, score in RULES:
        parts.append(f"[[rule]]\nname = {name!r}\nwhen = '{when}'\nscore = {score}\n")
    return "\n".join(parts)


FORCED = """[[rule]]
name = "dmarc_reject"
when = 'dmarc == "pass" && dmarc_policy == "reject" && spf == "pass"'
action = "reject"
reason = "bench: forced early"
"""


def registry() -> FactRegistry:
    async def never(ctx: FactContext) -> Any:
        raise AssertionError("preset facts are never computed")

    return FactRegistry(FactSpec(n, t, tier, never) for n, (t, tier, _) in FACTS.items())


def message() -> Message:
    return Message.from_file_bytes(
        b"From: a@sender.test\r\nSubject: bench\r\n\r\nbody\r\n",
        received_at=1_795_000_000.0,  # preset facts only: any fixed time
        mail_from="a@sender.test",
        rcpt_to=["bob@example.org"],
    )


async def per_call_us(fn: Callable[[], Awaitable[Any]], n: int, repeats: int) -> float:
    """Median CPU microseconds per call (CPU time, so other load on the machine counts less
    than it would in wall time; the loop is single-threaded and does no I/O)."""
    runs = []
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(n):
            await fn()
        runs.append((time.process_time() - start) / n * 1e6)
    return statistics.median(runs)


def sync_us(fn: Callable[[], Any], n: int, repeats: int = 5) -> float:
    runs = []
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(n):
            fn()
        runs.append((time.process_time() - start) / n * 1e6)
    return statistics.median(runs)


def expression_libraries(n: int) -> dict[str, Any]:
    """One T1 condition in both libraries: compile once, evaluate many times."""
    values = {"spf": "fail", "dmarc": "none", "p": 0.95, "recipient_count": 3, "tls": True}
    out: dict[str, Any] = {}
    cel_src = 'spf == "fail" && dmarc != "pass"'
    program = cel.compile(cel_src)
    context = cel.Context(variables=values)
    out["cel"] = {
        "condition": cel_src,
        "compile_us": round(sync_us(lambda: cel.compile(cel_src), max(n // 10, 100)), 2),
        "eval_shared_context_us": round(sync_us(lambda: program.execute(context), n), 2),
        "eval_dict_us": round(sync_us(lambda: program.execute(values), n), 2),
        "static_type_check": "no (names only; relay adds literal and probe checks)",
    }
    try:
        rule_engine: Any = importlib.import_module("rule_engine")
    except ImportError:
        out["rule_engine"] = {"skipped": "rule-engine not installed"}
        return out
    types = rule_engine.type_resolver_from_dict(
        {"spf": rule_engine.DataType.STRING, "dmarc": rule_engine.DataType.STRING}
    )
    ctx = rule_engine.Context(type_resolver=types)
    re_src = 'spf == "fail" and dmarc != "pass"'
    rule = rule_engine.Rule(re_src, context=ctx)
    out["rule_engine"] = {
        "condition": re_src,
        "compile_us": round(
            sync_us(lambda: rule_engine.Rule(re_src, context=ctx), max(n // 50, 50)), 2
        ),
        "eval_us": round(sync_us(lambda: rule.matches(values), n), 2),
        "static_type_check": "yes (declared symbol types; not == across types)",
    }
    return out


async def run(quick: bool) -> dict[str, Any]:
    n, repeats = (2_000, 3) if quick else (20_000, 7)
    reg = registry()
    preset = {name: value for name, (_, _, value) in FACTS.items()}
    full: Policy = compile_policy(policy_text(), reg, "bench30.toml")
    stop: Policy = compile_policy(policy_text(FORCED), reg, "bench30_forced.toml")
    msg = message()

    results: dict[str, Any] = {}
    for key, policy in (("full", full), ("stop", stop)):
        facts = Facts(reg, msg, Services(), preset)
        verdict = await policy.decide(msg, facts)
        results[key] = {
            "rules": len(policy.rules),
            "rules_evaluated": dict(verdict.extra)["rules_evaluated"],
            "action": verdict.action.value,
            "highest_tier": verdict.highest_tier.label if verdict.highest_tier else None,
            "decide_us": round(
                await per_call_us(partial(policy.decide, msg, facts), n, repeats), 2
            ),
        }

    async def fresh() -> Any:
        return await full.decide(msg, Facts(reg, msg, Services(), preset))

    results["facts_and_decide_us"] = round(await per_call_us(fresh, n, repeats), 2)
    text = policy_text()
    results["load_policy_ms"] = round(
        sync_us(lambda: compile_policy(text, reg, "bench30.toml"), 20 if quick else 100, 3) / 1000,
        3,
    )
    return {
        "benchmark": "policy decide()",
        "target_us": TARGET_US,
        "messages_per_repeat": n,
        "repeats": repeats,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "results": results,
        "expression_libraries": expression_libraries(n),
        "met": results["full"]["decide_us"] < TARGET_US,
    }


def markdown(data: dict[str, Any]) -> str:
    r = data["results"]
    libs = data["expression_libraries"]
    lines = [
        "# Policy engine: decide() cost",
        "",
        f"30 rules over T0/T1 facts, facts preset; CPU time, median of {data['repeats']} runs of "
        f"{data['messages_per_repeat']} messages (Python {data['python']}, {data['machine']}).",
        f"Produced by `.venv/bin/python -m bench.bench_policy`. Target: under "
        f"{data['target_us']:.0f} us per message.",
        "",
        "| scenario | rules evaluated | action | us / message |",
        "|---|---|---|---|",
        f"| all 30 rules evaluated | {r['full']['rules_evaluated']} | {r['full']['action']} "
        f"| {r['full']['decide_us']} |",
        f"| forced reject, early stop | {r['stop']['rules_evaluated']} | {r['stop']['action']} "
        f"| {r['stop']['decide_us']} |",
        f"| fresh preset Facts + decide (30 rules) | {r['full']['rules_evaluated']} "
        f"| {r['full']['action']} | {r['facts_and_decide_us']} |",
        "",
        f"Loading and validating the 30-rule policy: {r['load_policy_ms']} ms.",
        f"Target met: **{'yes' if data['met'] else 'no'}**.",
        "",
        "## Expression libraries (one condition)",
        "",
        "| library | compile us | evaluate us | static type check |",
        "|---|---|---|---|",
        f"| CEL (common-expression-language) | {libs['cel']['compile_us']} "
        f"| {libs['cel']['eval_shared_context_us']} (shared context), "
        f"{libs['cel']['eval_dict_us']} (dict) | {libs['cel']['static_type_check']} |",
    ]
    re_ = libs.get("rule_engine", {})
    if "skipped" in re_:
        lines.append(f"| rule-engine | - | - | {re_['skipped']} |")
    else:
        lines.append(
            f"| rule-engine | {re_['compile_us']} | {re_['eval_us']} | {re_['static_type_check']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    data = asyncio.run(run(args.quick))
    text = markdown(data)
    print(text)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "policy.json").write_text(json.dumps(data, indent=2) + "\n")
        (RESULTS / "policy.md").write_text(text)
    return 0 if data["met"] else 1


if __name__ == "__main__":
    sys.exit(main())

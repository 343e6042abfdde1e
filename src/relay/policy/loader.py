"""Policy files: TOML -> validated, compiled Policy, or PolicyError listing every problem.

One module because a single pass over a policy file collects every problem with its
line; over 300 lines because each section (thresholds, rules, overrides) is checked with
its own messages.

Each problem names the file, the line and (for rules) the rule, e.g.
``config/policy.toml:42: rule 'dmarc_reject': unknown fact 'dmark' (did you mean 'dmarc'?)``.
"""

from __future__ import annotations

import difflib
import math
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from relay.errors import PolicyError
from relay.facts.base import FactRegistry, FactType
from relay.idn import to_alabel
from relay.policy.engine import Policy
from relay.policy.expr import compile_condition
from relay.policy.lines import LineIndex
from relay.policy.model import PLACEHOLDER, Override, RuleSpec, Thresholds
from relay.proc.celsandbox import ConditionSandbox
from relay.verdict import Action, Mode, Tier

# Policy and rule names go into headers (X-Spam-Status), log lines and metric labels: a safe
# set only, always matched with fullmatch ("$" alone would accept a trailing newline).
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
NAME_RULE = "1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
MAX_REASON = 200
TOP_KEYS = frozenset({"policy", "rule", "override"})
POLICY_KEYS = frozenset({"name", "mode", "description", "thresholds", "required"})
THRESHOLD_KEYS = ("tag", "quarantine", "tempfail", "reject")
RULE_KEYS = frozenset({"name", "when", "score", "action", "reason", "description"})
OVERRIDE_KEYS = frozenset({"domains", "mode", "thresholds", "description"})


class _Problems:
    """Collects problems, each prefixed with file and line."""

    def __init__(self, source: str, lines: LineIndex) -> None:
        self.source = source
        self.lines = lines
        self._items: list[tuple[int, str]] = []

    def add(self, line: int, where: str, text: str) -> None:
        self._items.append((line, f"{self.source}:{line}: {where}: {text}"))

    @property
    def items(self) -> list[str]:
        """Problems in file order (stable for several on one line)."""
        return [text for _, text in sorted(self._items, key=lambda item: item[0])]

    def unknown_keys(
        self,
        table: Mapping[str, Any],
        known: Iterable[str],
        path: tuple[str | int, ...],
        where: str,
    ) -> None:
        allowed = sorted(known)
        for key in table:
            if key not in allowed:
                self.add(
                    self.lines.key(*path, key),
                    where,
                    f"unknown key {key!r} (known: {', '.join(allowed)})",
                )


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _mode(value: Any) -> Mode | None:
    try:
        return Mode(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _thresholds(
    table: Any,
    base: Thresholds,
    path: tuple[str | int, ...],
    where: str,
    p: _Problems,
) -> Thresholds:
    if table is None:
        return base
    if not isinstance(table, dict):
        p.add(p.lines.key(*path), where, "'thresholds' must be a table")
        return base
    p.unknown_keys(table, THRESHOLD_KEYS, path, where)
    values: dict[str, float | None] = {
        "tag": base.tag,
        "quarantine": base.quarantine,
        "tempfail": base.tempfail,
        "reject": base.reject,
    }
    for key in THRESHOLD_KEYS:
        if key in table:
            number = _number(table[key])
            if number is None:
                p.add(p.lines.key(*path, key), where, f"threshold {key!r} must be a finite number")
            else:
                values[key] = number
    result = Thresholds(**values)
    for problem in result.problems():
        p.add(p.lines.table(*path), where, problem)
    return result


def _reason(value: Any, line: int, where: str, p: _Problems) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        p.add(line, where, "'reason' must be a string")
        return ""
    # The reason may become an SMTP reply text: one printable line only.
    if any(not ch.isprintable() for ch in value):
        p.add(line, where, "'reason' must be one line of printable text")
    elif len(value) > MAX_REASON:
        p.add(line, where, f"'reason' is longer than {MAX_REASON} characters")
    return value


def _reason_facts(
    reason: str, registry: FactRegistry, line: int, where: str, p: _Problems
) -> tuple[str, ...]:
    """The facts a reason shows as ``{name}``: registered, and numbers only, because the
    reason becomes the SMTP reply and must never echo text a sender chose (a HELO name,
    a header)."""
    names: list[str] = []
    for name in dict.fromkeys(PLACEHOLDER.findall(reason)):
        if name not in registry:
            close = difflib.get_close_matches(name, registry.names(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            p.add(line, where, f"unknown fact {name!r} in 'reason'{hint}")
        elif registry[name].type not in (FactType.INT, FactType.FLOAT):
            p.add(
                line,
                where,
                f"'reason' may show numeric facts only; {name!r} is {registry[name].type.value}",
            )
        else:
            names.append(name)
    return tuple(names)


def _domain(text: str) -> str | None:
    wildcard = text.startswith("*.")
    name = text[2:] if wildcard else text
    name = name.strip().rstrip(".").lower()
    try:
        name = to_alabel(name) if not name.isascii() else name
    except ValueError:
        return None
    if not name or any(c in name for c in " @[]*/"):
        return None
    return f"*.{name}" if wildcard else name


def _rule(
    index: int,
    table: Any,
    registry: FactRegistry,
    seen: dict[str, int],
    p: _Problems,
) -> tuple[RuleSpec, Any] | None:
    path: tuple[str | int, ...] = ("rule", index)
    line = p.lines.table(*path)
    if not isinstance(table, dict):
        p.add(line, f"rule #{index + 1}", "must be a table")
        return None
    raw_name = table.get("name")
    name = raw_name if isinstance(raw_name, str) else ""
    where = f"rule {name!r}" if name else f"rule #{index + 1}"
    ok = True
    if not name:
        p.add(line, where, "'name' is missing or not a string")
        ok = False
    elif not NAME.fullmatch(name):
        p.add(p.lines.key(*path, "name"), where, f"name must be {NAME_RULE}")
        ok = False
    elif name in seen:
        p.add(
            p.lines.key(*path, "name"),
            where,
            f"duplicate rule name (first defined at line {seen[name]})",
        )
        ok = False
    else:
        seen[name] = line
    p.unknown_keys(table, RULE_KEYS, path, where)

    when = table.get("when")
    program: Any = None
    reads: tuple[str, ...] = ()
    isolated = False
    if not isinstance(when, str):
        p.add(line, where, "'when' is missing or not a string")
        ok = False
    else:
        condition, problems = compile_condition(when, registry)
        for problem in problems:
            p.add(p.lines.key(*path, "when"), where, problem)
        if condition is None:
            ok = False
        else:
            program, reads, isolated = condition.program, condition.reads, condition.isolated

    has_score, has_action = "score" in table, "action" in table
    score = 0.0
    action: Action | None = None
    if has_score and has_action:
        p.add(line, where, "a rule has either 'score' or 'action', not both")
        ok = False
    elif not has_score and not has_action:
        p.add(line, where, "a rule needs 'score' or a forced 'action'")
        ok = False
    elif has_score:
        number = _number(table["score"])
        if number is None:
            p.add(p.lines.key(*path, "score"), where, "'score' must be a finite number")
            ok = False
        else:
            score = number
    else:
        try:
            action = Action(table["action"])
        except ValueError:
            choices = ", ".join(a.value for a in Action)
            p.add(
                p.lines.key(*path, "action"),
                where,
                f"unknown forced action {table['action']!r} (one of: {choices})",
            )
            ok = False
    if "description" in table and not isinstance(table["description"], str):
        p.add(p.lines.key(*path, "description"), where, "'description' must be a string")
    reason_line = p.lines.key(*path, "reason")
    reason = _reason(table.get("reason"), reason_line, where, p)
    shown = _reason_facts(reason, registry, reason_line, where, p)
    if not ok or len(shown) != len(set(PLACEHOLDER.findall(reason))):
        return None
    # A fact the reason shows is read with the condition's: pulled in the same tier group,
    # counted in the rule's tier, and a rule whose shown fact is missing does not fire.
    reads = tuple(dict.fromkeys((*reads, *shown)))
    tier = max((registry[n].tier for n in reads), default=Tier.CONNECTION)
    spec = RuleSpec(
        name,
        when if isinstance(when, str) else "",
        reads,
        tier,
        score,
        action,
        reason,
        line,
        isolated,
        shown,
    )
    return spec, program


def _overrides(items: Any, base: Thresholds, mode: Mode, p: _Problems) -> list[Override]:
    out: list[Override] = []
    if items is None:
        return out
    if not isinstance(items, list):
        p.add(p.lines.key("override"), "[[override]]", "'override' must be an array of tables")
        return out
    claimed: dict[str, int] = {}
    for index, table in enumerate(items):
        path: tuple[str | int, ...] = ("override", index)
        line = p.lines.table(*path)
        where = f"override #{index + 1}"
        if not isinstance(table, dict):
            p.add(line, where, "must be a table")
            continue
        p.unknown_keys(table, OVERRIDE_KEYS, path, where)
        domains_value = table.get("domains")
        domains: list[str] = []
        if (
            not isinstance(domains_value, list)
            or not domains_value
            or not all(isinstance(d, str) for d in domains_value)
        ):
            p.add(
                p.lines.key(*path, "domains"),
                where,
                "'domains' must be a non-empty list of strings",
            )
        else:
            for text in domains_value:
                domain = _domain(text)
                if domain is None:
                    p.add(p.lines.key(*path, "domains"), where, f"invalid domain {text!r}")
                elif domain in claimed:
                    p.add(
                        p.lines.key(*path, "domains"),
                        where,
                        f"domain {domain!r} is already in override #{claimed[domain]}",
                    )
                else:
                    claimed[domain] = index + 1
                    domains.append(domain)
        override_mode = mode
        if "mode" in table:
            parsed = _mode(table["mode"])
            if parsed is None:
                p.add(p.lines.key(*path, "mode"), where, '\'mode\' must be "enforce" or "shadow"')
            else:
                override_mode = parsed
        thresholds = _thresholds(table.get("thresholds"), base, (*path, "thresholds"), where, p)
        out.append(Override(tuple(domains), thresholds, override_mode, line))
    return out


def compile_policy(
    text: str,
    registry: FactRegistry,
    source: str = "<policy>",
    sandbox: ConditionSandbox | None = None,
) -> Policy:
    """Validate and compile policy text; raises PolicyError with every problem found.
    ``sandbox`` runs the conditions with comprehensions (None: on the caller's thread, as
    the lab and the command line do, where no event loop serves clients)."""
    lines = LineIndex(text)
    p = _Problems(source, lines)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"line (\d+)", str(exc))
        raise PolicyError(
            [f"{source}:{match.group(1) if match else 1}: invalid TOML: {exc}"]
        ) from None

    p.unknown_keys(data, TOP_KEYS, (), "policy file")
    head = data.get("policy")
    name, mode, base = "", Mode.ENFORCE, Thresholds()
    required: tuple[str, ...] = ()
    if not isinstance(head, dict):
        p.add(1, "[policy]", "the [policy] table is missing")
    else:
        p.unknown_keys(head, POLICY_KEYS, ("policy",), "[policy]")
        raw_name = head.get("name")
        if not isinstance(raw_name, str) or not raw_name.strip():
            p.add(lines.key("policy", "name"), "[policy]", "'name' is missing or empty")
        elif not NAME.fullmatch(raw_name):
            p.add(
                lines.key("policy", "name"),
                "[policy]",
                f"name {raw_name[:80]!r} must be {NAME_RULE}",
            )
        else:
            name = raw_name
        if "mode" in head:
            parsed = _mode(head["mode"])
            if parsed is None:
                p.add(
                    lines.key("policy", "mode"),
                    "[policy]",
                    '\'mode\' must be "enforce" or "shadow"',
                )
            else:
                mode = parsed
        if "description" in head and not isinstance(head["description"], str):
            p.add(lines.key("policy", "description"), "[policy]", "'description' must be a string")
        base = _thresholds(
            head.get("thresholds"), Thresholds(), ("policy", "thresholds"), "[policy.thresholds]", p
        )
        required = _required(head.get("required", []), registry, p)

    rules: list[RuleSpec] = []
    programs: dict[str, Any] = {}
    raw_rules = data.get("rule", [])
    if not isinstance(raw_rules, list):
        p.add(lines.key("rule"), "[[rule]]", "'rule' must be an array of tables ([[rule]])")
        raw_rules = []
    seen: dict[str, int] = {}
    for index, table in enumerate(raw_rules):
        compiled = _rule(index, table, registry, seen, p)
        if compiled is not None:
            rules.append(compiled[0])
            programs[compiled[0].name] = compiled[1]
    overrides = _overrides(data.get("override"), base, mode, p)
    read = {n for r in rules for n in r.reads}
    for fact in required:
        if fact not in read:
            p.add(
                lines.key("policy", "required"),
                "[policy]",
                f"required fact {fact!r} is read by no rule of this policy",
            )
    if p.items:
        raise PolicyError(p.items)
    float_facts = frozenset(s.name for s in registry if s.type is FactType.FLOAT)
    return Policy(
        name=name,
        mode=mode,
        rules=rules,
        programs=programs,
        thresholds=base,
        overrides=overrides,
        float_facts=float_facts,
        source=source,
        sandbox=sandbox,
        required=frozenset(required),
    )


def _required(raw: Any, registry: FactRegistry, p: _Problems) -> tuple[str, ...]:
    """``[policy] required``: facts whose failure defers the message instead of letting
    the rules that read them stay silent (fail closed; docs/policy.md)."""
    line = p.lines.key("policy", "required")
    if not isinstance(raw, list) or not all(isinstance(n, str) for n in raw):
        p.add(line, "[policy]", "'required' must be a list of fact names")
        return ()
    for name in raw:
        if name not in registry:
            p.add(line, "[policy]", f"required fact {name!r} is not a known fact")
    return tuple(n for n in raw if n in registry)


def load_policy(
    path: Path, registry: FactRegistry, sandbox: ConditionSandbox | None = None
) -> Policy:
    """Read, validate and compile a policy file; raises PolicyError naming file and line.

    This is also the reload entry point: on PolicyError the caller keeps its old policy.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError([f"{path}:0: file not found"]) from None
    except UnicodeDecodeError as exc:
        raise PolicyError([f"{path}:0: not UTF-8 text ({exc.reason})"]) from None
    except OSError as exc:
        raise PolicyError([f"{path}:0: cannot read: {exc.strerror}"]) from None
    return compile_policy(text, registry, str(path), sandbox)


def check_files(paths: Iterable[Path], registry: FactRegistry) -> list[str]:
    """Every problem of every file (empty when all are valid), for `relay policy check`."""
    problems: list[str] = []
    for path in paths:
        try:
            load_policy(path, registry)
        except PolicyError as exc:
            problems.extend(exc.problems)
    return problems

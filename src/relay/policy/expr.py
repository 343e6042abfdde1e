"""Rule conditions: CEL expressions compiled once at load, checked against fact types.

CEL (``common-expression-language``, a Rust implementation) is sandboxed by design: no
I/O, no Python objects, no unbounded loops, RE2 regular expressions. Its Python binding
parses but does not type-check, so a condition is checked here in three steps:

1. names: every free identifier must be a registered fact (macro variables such as the
   ``d`` in ``domains.exists(d, ...)`` are bound, not facts);
2. literal comparisons: ``fact == literal`` must compare like with like, because CEL
   answers false (not an error) for ``tls_used == "yes"``;
3. probes: the program runs on typed sample values of its facts (both booleans, small and
   large numbers, the empty string and every string literal in the condition), so
   operator errors such as ``spam_probability > "high"`` or a non-boolean result are
   caught at load, not on the first message that reaches them.

Before any of that, the condition's worst-case cost is bounded (issue 15, finding 6): CEL
has no loops, but comprehension macros (``all``, ``exists``, ``exists_one``, ``map``,
``filter``) nest, and conditions run on the event loop. The binding exposes no AST or cost
estimator, so ``condition_cost`` estimates over the tokens: a comprehension costs the size
of the list it ranges over times its body; see ``MAX_COST`` and docs/policy.md. Steps
are not time (a step's work grows with the values it reads), so ``matches`` must take a
literal pattern and a condition with a comprehension is marked ``isolated``: the relay
runs it in ``relay.proc.celsandbox`` with a per-message time limit.
"""

from __future__ import annotations

import difflib
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from relay.celext import cel
from relay.facts.base import FactRegistry, FactType

_SYNTAX = re.compile(r"<input>:(\d+):(\d+): (.*)")
_BOUND = re.compile(r"\.\s*(?:all|exists|exists_one|map|filter)\s*\(\s*([A-Za-z_]\w*)\s*,")
_STRING = re.compile(r""""((?:[^"\\]|\\.)*)"|'((?:[^'\\]|\\.)*)'""")
_LITERAL = (
    r"""(?P<lit>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'"""
    r"|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?u?|true|false|null)"
)
MAX_PROBES = 512

# Cost budget (docs/policy.md, "Cost budget"). A step is one operand or operator of the
# condition; a comprehension costs (size of its range) x (its body + 1), and map or filter
# also (size)^2 / 4, as the binding copies the partial result at each element (measured:
# 1,000 elements take 0.15 ms with all, 22 ms with map).
MAX_LENGTH = 2_000  # characters of one condition
MAX_DEPTH = 2  # comprehensions inside a comprehension's body or range, counting itself
MAX_COST = 20_000  # estimated steps of one evaluation, worst case
LIST_FACT_MAX = 1_000  # assumed length of a list fact (or of any list not written out)
_MACROS = frozenset({"all", "exists", "exists_one", "map", "filter"})
_TOKEN = re.compile(
    r"(?P<ws>\s+|//[^\n]*)"
    # strings: raw ones (r or R prefix, maybe with b) have no escapes; triple quotes first
    r"|(?P<str>(?:[bB]?[rR]|[rR][bB])(?:'''.*?'''|\"\"\".*?\"\"\"|'[^'\n]*'|\"[^\"\n]*\")"
    r"|[bB]?(?:'''(?:\\.|[^\\])*?'''|\"\"\"(?:\\.|[^\\])*?\"\"\""
    r"|'(?:\\.|[^'\\\n])*'|\"(?:\\.|[^\"\\\n])*\"))"
    r"|(?P<num>0[xX][0-9a-fA-F]+[uU]?|(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?[uU]?)"
    r"|(?P<id>[A-Za-z_]\w*)"
    r"|(?P<op>&&|\|\||==|!=|<=|>=|.)",
    re.DOTALL,
)
_OPEN = {"(": ")", "[": "]", "{": "}"}
_CLOSE = frozenset(_OPEN.values())
_FREE = frozenset("()[]{},.:")  # punctuation: no step of its own

_PROBES: dict[FactType, tuple[Any, ...]] = {
    FactType.BOOL: (False, True),
    FactType.INT: (0, 1_000_000),
    FactType.FLOAT: (0.0, 1.0, 1e12),
    FactType.OBJECT: ({},),
}

_LITERAL_OK: dict[FactType, frozenset[str]] = {
    FactType.BOOL: frozenset({"bool", "null"}),
    FactType.INT: frozenset({"number", "null"}),
    FactType.FLOAT: frozenset({"number", "null"}),
    FactType.STR: frozenset({"string", "null"}),
    FactType.STR_LIST: frozenset({"null"}),
}


@dataclass(frozen=True, slots=True)
class Condition:
    source: str
    program: Any  # cel.Program (the binding ships no usable stubs for mypy's path)
    reads: tuple[str, ...]
    # Has a comprehension: run in the sandbox child with a time limit, not on the loop
    # (relay.proc.celsandbox says why the step budget alone does not bound the time).
    isolated: bool = False


@dataclass(frozen=True, slots=True)
class Cost:
    """Worst-case estimate of one evaluation: steps and comprehension nesting depth."""

    steps: int
    depth: int


class _CostModel:
    """Token-level estimate; the text has already been parsed by CEL, so it is valid."""

    def __init__(self, source: str) -> None:
        self.kinds: list[str] = []
        self.texts: list[str] = []
        for match in _TOKEN.finditer(source):
            kind = match.lastgroup or "op"
            if kind != "ws":
                self.kinds.append(kind)
                self.texts.append(match.group())
        self.match: dict[int, int] = {}
        stack: list[int] = []
        for i, text in enumerate(self.texts):
            if self.kinds[i] != "op":
                continue
            if text in _OPEN:
                stack.append(i)
            elif text in _CLOSE and stack:
                self.match[i] = stack.pop()
                self.match[self.match[i]] = i
        self.depth_at: dict[int, int] = {}  # '.' index of a comprehension -> its depth
        self.size_of: dict[int, int] = {}  # '.' index of a map or filter -> result size

    def _ends_operand(self, i: int) -> bool:
        kind, text = self.kinds[i], self.texts[i]
        if kind == "id":
            return text != "in"
        return kind in ("str", "num") or (kind == "op" and text in _CLOSE)

    def _receiver_start(self, end: int) -> int:
        """First token of the postfix expression ending at ``end`` (what ``.all`` ranges over)."""
        p = end
        while True:
            if self.kinds[p] == "op" and self.texts[p] in _CLOSE and p in self.match:
                opened = self.match[p]
                before = opened - 1
                if (
                    before >= 0
                    and self._ends_operand(before)
                    and (self.texts[p] != ")" or self.kinds[before] == "id")
                ):
                    p = before  # call arguments, index or message fields: keep walking
                    continue
                p = opened  # a group, list or map literal
            if p >= 2 and self.texts[p - 1] == "." and self.kinds[p - 1] == "op":
                p -= 2
                continue
            return p

    def _range_size(self, start: int, end: int) -> int:
        """Elements of the range ``tokens[start:end+1]``: counted for a list or map literal,
        that of the range for a ``map`` or ``filter`` result, else ``LIST_FACT_MAX``."""
        opened = self.match.get(end, -1)
        if opened == start and self.texts[start] in "[{" and self.kinds[start] == "op":
            level, elements = 0, 0 if end == start + 1 else 1
            for i in range(start + 1, end):
                if self.kinds[i] == "op" and self.texts[i] in _OPEN:
                    level += 1
                elif self.kinds[i] == "op" and self.texts[i] in _CLOSE:
                    level -= 1
                elif level == 0 and self.texts[i] == "," and self.kinds[i] == "op":
                    elements += 1
            return elements
        if self.texts[end] == ")" and opened >= 2 and (opened - 2) in self.size_of:
            return self.size_of[opened - 2]
        return LIST_FACT_MAX  # a fact, a bound variable, a member, a call

    def _is_macro(self, i: int, end: int) -> bool:
        return (
            i + 2 < end
            and self.texts[i] == "."
            and self.kinds[i + 1] == "id"
            and self.texts[i + 1] in _MACROS
            and self.texts[i + 2] == "("
            and (i + 2) in self.match
        )

    def span(self, start: int, end: int) -> Cost:
        """Cost of tokens[start:end]."""
        steps = depth = 0
        i = start
        while i < end:
            if self._is_macro(i, end):
                close = self.match[i + 2]
                body = i + 3
                # skip the bound variable and its comma: ``x,`` (and ``k, v,`` for two)
                while body < close and self.texts[body] != ",":
                    body += 1
                inner = self.span(body + 1, close)
                first = self._receiver_start(i - 1) if i > start else i
                ranged = max((d for k, d in self.depth_at.items() if first <= k < i), default=0)
                here = 1 + max(inner.depth, ranged)
                self.depth_at[i] = here
                size = self._range_size(first, i - 1) if i > start else LIST_FACT_MAX
                if self.texts[i + 1] in ("map", "filter"):
                    self.size_of[i] = size
                steps += size * (inner.steps + 1)
                if self.texts[i + 1] in ("map", "filter"):
                    # the binding copies the list built so far at each element: quadratic
                    steps += size * size // 4
                depth = max(depth, here)
                i = close + 1
                continue
            if self.kinds[i] != "op" or self.texts[i] not in _FREE:
                steps += 1
            i += 1
        return Cost(steps, depth)


def condition_cost(source: str) -> Cost:
    """Worst-case steps and comprehension depth of a condition (valid CEL text)."""
    model = _CostModel(source)
    return model.span(0, len(model.texts))


def _regex_problems(model: _CostModel) -> list[str]:
    """``matches`` must take a string literal: a pattern built from message data is
    compiled for every message (60 such calls on a 20 KB header took 0.96 s)."""
    texts, kinds = model.texts, model.kinds
    for i, text in enumerate(texts):
        if kinds[i] != "id" or text != "matches" or i + 1 >= len(texts) or texts[i + 1] != "(":
            continue
        close = model.match.get(i + 1)
        if close is None:
            continue
        method = i > 0 and texts[i - 1] == "." and kinds[i - 1] == "op"
        args: list[list[int]] = [[]]
        level = 0
        for k in range(i + 2, close):
            if kinds[k] == "op" and texts[k] in _OPEN:
                level += 1
            elif kinds[k] == "op" and texts[k] in _CLOSE:
                level -= 1
            if level == 0 and kinds[k] == "op" and texts[k] == ",":
                args.append([])
            else:
                args[-1].append(k)
        pattern = args[0] if method else args[-1]
        if len(pattern) != 1 or kinds[pattern[0]] != "str":
            return [
                "matches() takes a string literal as its pattern, not one built from facts "
                "(a pattern from message data would be compiled for every message)"
            ]
    return []


def _cost_problems(source: str) -> list[str]:
    problems = _regex_problems(_CostModel(source))
    if problems:
        return problems
    cost = condition_cost(source)
    if cost.depth > MAX_DEPTH:
        return [
            f"too costly: comprehensions (all, exists, exists_one, map, filter) nested "
            f"{cost.depth} deep, at most {MAX_DEPTH}"
        ]
    if cost.steps > MAX_COST:
        return [
            f"too costly: worst case about {cost.steps:,} steps per message, at most "
            f"{MAX_COST:,} (a comprehension costs its list's length times its body; a list "
            f"fact counts as {LIST_FACT_MAX:,} elements)"
        ]
    return []


def _syntax_problem(exc: Exception) -> str:
    match = _SYNTAX.search(str(exc))
    if match is None:
        return f"syntax error: {str(exc).splitlines()[0]}"
    line, column, text = match.groups()
    text = text.split(" expecting {")[0]  # the token list ANTLR adds is noise to an operator
    where = f"column {column}" if line == "1" else f"line {line} column {column}"
    return f"syntax error at {where} of the condition: {text}"


def _literal_kind(text: str) -> str:
    if text[0] in "\"'":
        return "string"
    if text in ("true", "false"):
        return "bool"
    if text == "null":
        return "null"
    return "number"


def _literal_problems(source: str, reads: tuple[str, ...], registry: FactRegistry) -> list[str]:
    out: list[str] = []
    for name in reads:
        allowed = _LITERAL_OK.get(registry[name].type)
        if allowed is None:
            continue
        fact = rf"(?<![\w.]){re.escape(name)}(?![\w.(\[])"
        for pattern in (rf"{fact}\s*(?:==|!=)\s*{_LITERAL}", rf"{_LITERAL}\s*(?:==|!=)\s*{fact}"):
            for match in re.finditer(pattern, source):
                kind = _literal_kind(match.group("lit"))
                if kind not in allowed:
                    out.append(
                        f"wrong type: fact {name!r} is {registry[name].type.value} but is "
                        f"compared with a {kind} ({match.group('lit')}), which is never equal"
                    )
    return out


def _probe_values(ftype: FactType, strings: tuple[str, ...]) -> tuple[Any, ...]:
    if ftype is FactType.STR:
        return ("", *strings)
    if ftype is FactType.STR_LIST:
        return ([], ["", *strings])
    return _PROBES[ftype]


def _assignments(
    reads: tuple[str, ...], registry: FactRegistry, source: str
) -> Iterator[dict[str, Any]]:
    strings = tuple(dict.fromkeys(a or b for a, b in _STRING.findall(source)))[:6]
    choices = [_probe_values(registry[n].type, strings) for n in reads]
    for values in itertools.islice(itertools.product(*choices), MAX_PROBES):
        yield dict(zip(reads, values, strict=True))


def _first_sentence(text: str) -> str:
    head = text.strip().splitlines()[0] if text.strip() else text
    return head.split(". ")[0].rstrip(".:")


def _probe_problems(
    program: Any, reads: tuple[str, ...], registry: FactRegistry, source: str
) -> list[str]:
    reads_object = any(registry[n].type is FactType.OBJECT for n in reads)
    typed = ", ".join(f"{n}: {registry[n].type.value}" for n in reads) or "no facts"
    for assignment in _assignments(reads, registry, source):
        try:
            result = program.execute(assignment)
        except TypeError as exc:
            text = _first_sentence(str(exc))
            if text.startswith("No such overload"):
                text = "an operator or function is applied to values of the wrong type"
            return [f"wrong type: {text} (facts read: {typed})"]
        except KeyError:
            if reads_object:  # an object fact's keys are not declared; absent ones are fine
                continue
            return [f"unknown key in condition (facts read: {typed})"]
        except (ZeroDivisionError, OverflowError):
            continue  # depends on the value, not on the types
        except (RuntimeError, ValueError) as exc:
            return [f"invalid condition: {_first_sentence(str(exc))} (facts read: {typed})"]
        if not isinstance(result, bool):
            kind = "null" if result is None else type(result).__name__
            return [f"condition must give a bool, but gives {kind} (facts read: {typed})"]
    return []


def compile_condition(source: str, registry: FactRegistry) -> tuple[Condition | None, list[str]]:
    """Compile and check one condition; returns the condition or the problems found."""
    if not source.strip():
        return None, ["'when' is empty"]
    if len(source) > MAX_LENGTH:
        return None, [f"condition is too long ({len(source)} characters, at most {MAX_LENGTH})"]
    try:
        program = cel.compile(source)
    except ValueError as exc:
        return None, [_syntax_problem(exc)]
    problems = _cost_problems(source)  # before the probes, which run the program
    if problems:
        return None, problems
    bound = set(_BOUND.findall(source))
    reads = tuple(n for n in program.variables() if n not in bound)
    unknown = [n for n in reads if n not in registry]
    if unknown:
        names = registry.names()
        problems = []
        for name in unknown:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"unknown fact {name!r}{hint}")
        return None, problems
    problems = _literal_problems(source, reads, registry)
    problems += _probe_problems(program, reads, registry, source)
    if problems:
        return None, problems
    return Condition(source, program, reads, isolated=condition_cost(source).depth > 0), []

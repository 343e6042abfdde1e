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
"""

from __future__ import annotations

import difflib
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import cel

from relay.facts.base import FactRegistry, FactType

_SYNTAX = re.compile(r"<input>:(\d+):(\d+): (.*)")
_BOUND = re.compile(r"\.\s*(?:all|exists|exists_one|map|filter)\s*\(\s*([A-Za-z_]\w*)\s*,")
_STRING = re.compile(r""""((?:[^"\\]|\\.)*)"|'((?:[^'\\]|\\.)*)'""")
_LITERAL = (
    r"""(?P<lit>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'"""
    r"|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?u?|true|false|null)"
)
MAX_PROBES = 512

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
    try:
        program = cel.compile(source)
    except ValueError as exc:
        return None, [_syntax_problem(exc)]
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
    return Condition(source, program, reads), []

"""Layers only point down: the package's imports, read with ast, have no cycle and no
upward edge. The order below is the one drawn in docs/architecture.md; change both
together.

Every import counts, including those inside functions and under TYPE_CHECKING: a
function-level import is still a dependency, it only hides the cycle from Python.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first. A module may import its own unit and units of lower layers; units that
# share a layer do not import each other.
LAYERS: tuple[tuple[str, ...], ...] = (
    (
        "relay.errors",
        "relay.reply",
        "relay.verdict",
        "relay.idn",
        "relay.intervals",
        "relay.durable",
        "relay.loglimit",
        "relay.listening",
        "relay.logconfig",
        "relay.celext",
    ),  # values; durable: stdlib file writes; loglimit: one line per key per minute
    ("relay.message", "relay.config", "relay.secretkey"),
    ("relay.contracts",),  # the seams: Decider, Stamp, Observer, Transport, Quarantine
    ("relay.proc", "relay.dns", "relay.state", "relay.corpus"),  # infrastructure
    ("relay.auth", "relay.classifier"),  # the checks facts are made of
    ("relay.analysis",),  # the child that classifies and verifies, one per relay worker
    ("relay.facts", "relay.feedback"),  # feedback: reports in, the store, training view
    ("relay.models",),  # model versions: update from feedback, registry, live swap
    ("relay.policy",),
    ("relay.delivery",),
    ("relay.pipeline",),
    ("relay.assembly",),  # Settings -> services, transport, policy, stamps
    ("relay.smtp", "relay.milter", "relay.ops"),  # the front doors and the observers
    ("relay.lab",),
    ("relay.app",),  # composition root
    ("relay.launch",),  # relay serve: one relay here, or a lean supervisor of workers
    ("relay.cli",),
)
UNITS = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit_of(module: str) -> str | None:
    for unit in sorted(UNITS, key=len, reverse=True):
        if module == unit or module.startswith(unit + "."):
            return unit
    return None


def imports_of(path: Path, module: str, modules: frozenset[str] = frozenset()) -> set[str]:
    """The project modules ``module`` imports. ``from pkg import sub`` counts as importing
    the module ``pkg.sub`` when there is one (``modules``), else as importing ``pkg``."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            subs = {f"{base}.{a.name}" for a in node.names}
            found.update((subs & modules) or {base})
    return {m for m in found if m == "relay" or m.startswith("relay.")}


def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in (SRC / "relay").rglob("*.py")}
    known = frozenset(paths)
    return {
        mod: {imp for imp in imports_of(path, mod, known) if imp in paths and imp != mod}
        for mod, path in paths.items()
    }


def test_every_module_has_a_layer() -> None:
    loose = sorted(m for m in graph() if m != "relay" and unit_of(m) is None)
    assert not loose, f"modules outside every layer (add them to LAYERS): {loose}"


def test_imports_only_point_down() -> None:
    upward = []
    for mod, targets in graph().items():
        src = unit_of(mod)
        if src is None:
            continue
        for target in sorted(targets):
            dst = unit_of(target)
            if dst is None or dst == src:
                continue
            if UNITS[dst] >= UNITS[src]:
                upward.append(f"{mod} -> {target}")
    assert not upward, "imports that do not point down:\n  " + "\n  ".join(upward)


def test_no_import_cycles() -> None:
    edges = graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(mod: str) -> None:
        state[mod] = 1
        stack.append(mod)
        for nxt in sorted(edges[mod]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[mod] = 2

    for mod in sorted(edges):
        if mod not in state:
            visit(mod)
    assert not cycles, "import cycles:\n  " + "\n  ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from relay.smtp.server import RelaySMTP\n", {"relay.smtp.server"}),
        ("def f():\n    import relay.app\n", {"relay.app"}),
        ("from . import actions\n", {"relay.pipeline.actions"}),
        ("from relay.pipeline import Pipeline\n", {"relay.pipeline"}),
    ],
)
def test_the_walker_sees_every_kind_of_import(
    tmp_path: Path, source: str, expected: set[str]
) -> None:
    path = tmp_path / "mod.py"
    path.write_text(source)
    modules = frozenset({"relay.smtp.server", "relay.app", "relay.pipeline.actions"})
    assert imports_of(path, "relay.pipeline.mod", modules) == expected

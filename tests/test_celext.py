"""The CEL engine is loaded without its package's interactive CLI (relay/celext.py)."""

from __future__ import annotations

import subprocess
import sys


def _run(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return out.stdout.strip()


def test_policies_compile_and_run_without_the_cli_libraries() -> None:
    out = _run(
        "import sys\n"
        "from relay.policy import load_policy\n"
        "from relay.celext import cel\n"
        "print(cel.compile('size(x) + 1').execute(cel.Context({'x': [1, 2]})))\n"
        "print(sorted(m for m in ('cel.cli', 'prompt_toolkit', 'rich') if m in sys.modules))\n"
    )
    assert out.splitlines() == ["3", "[]"]


def test_the_package_imported_later_reuses_the_one_extension() -> None:
    out = _run(
        "from relay.celext import cel as ext\n"
        "import cel\n"
        "print(cel.compile is ext.compile, cel.Context is ext.Context)\n"
    )
    assert out == "True True"

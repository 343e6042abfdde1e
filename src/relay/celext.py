"""The CEL engine: common-expression-language's compiled extension, loaded without its
package's ``__init__``.

That ``__init__`` imports the package's interactive command-line tool (``cel.cli``:
prompt_toolkit, rich ...) before the extension. Measured in a fresh interpreter:
``import cel`` took the process to 38 MiB RSS, the extension alone to 14 MiB. Every SMTP
worker, the CEL sandbox child and the lab's processes compile policies, so that is
about 24 MiB per process of a tree whose memory is a target (issue 17).

The extension is registered as ``cel.cel``, the name the package's own ``__init__``
imports it by, so a later ``import cel`` (a tool, a test) reuses it instead of
initialising the extension twice. If a release moves the extension, the package is
imported whole, as before: heavier, never broken.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

EXTENSION = "cel.cel"


def _load() -> ModuleType:
    loaded = sys.modules.get(EXTENSION)
    if loaded is not None:
        return loaded
    package = importlib.util.find_spec("cel")  # finds the package, runs none of it
    folders = package.submodule_search_locations if package is not None else None
    for folder in folders or ():
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = Path(folder) / f"cel{suffix}"
            spec = importlib.util.spec_from_file_location(EXTENSION, path)
            if not path.is_file() or spec is None or spec.loader is None:
                continue
            module = importlib.util.module_from_spec(spec)
            sys.modules[EXTENSION] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[EXTENSION]
                raise
            return module
    return importlib.import_module("cel")


cel = _load()

__all__ = ["cel"]

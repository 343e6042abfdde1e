"""The one error tree (errors.py): every exception class in src/relay derives from
RelayError and is drawn in errors.py's docstring."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import relay
import relay.errors
from relay.errors import RelayError

# Not errors, so outside the tree on purpose (errors.py's docstring says why).
OUTSIDE = {
    "relay.auth.spf._NeedAnswer": "a BaseException for control flow through pyspf",
}


def exception_classes() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(relay.__path__, "relay."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == module.__name__
            ):
                found[f"{module.__name__}.{name}"] = obj
    return found


def test_every_exception_class_is_in_the_relay_error_tree() -> None:
    found = exception_classes()
    assert "relay.errors.FactError" in found and "relay.dns.DnsTemporaryError" in found
    outside = sorted(name for name, cls in found.items() if not issubclass(cls, RelayError))
    assert outside == sorted(OUTSIDE), "derive these from RelayError (errors.py)"


def test_the_tree_is_drawn_in_the_errors_docstring() -> None:
    doc = relay.errors.__doc__ or ""
    missing = sorted(name for name in exception_classes() if name.rpartition(".")[2] not in doc)
    assert not missing, f"draw these in errors.py's docstring: {missing}"


def test_no_protocol_shares_a_name_with_a_class() -> None:
    """contracts.Quarantine is the Protocol and delivery's QuarantineStore the class: a
    name means one thing."""
    kinds: dict[str, set[str]] = {}
    for info in pkgutil.walk_packages(relay.__path__, "relay."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and obj.__module__ == module.__name__:
                protocol = bool(getattr(obj, "_is_protocol", False))
                kinds.setdefault(name, set()).add("protocol" if protocol else "class")
    assert not [n for n, k in kinds.items() if k == {"protocol", "class"}]

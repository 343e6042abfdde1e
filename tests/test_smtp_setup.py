"""What a connection costs to set up: aiosmtpd's ``SMTP.__init__`` introspects the protocol
and the handler (``inspect.getmembers``, ``dir``, ``inspect.signature``) on every
connection. Walking every attribute took 0.1 ms a connection (issue 17); ``__dir__`` on
both (smtp/server.py, smtp/handler.py) keeps the walk to the names aiosmtpd looks for.
These tests count what is walked, never time it."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest

from relay.smtp.handler import Handler
from relay.smtp.server import INTROSPECTED, RelaySMTP, _junk_counted
from tests.support.relay import RawClient, make_settings, running_relay


def _full_names(obj: object) -> list[str]:
    """What dir() lists without our ``__dir__``: every attribute."""
    return list(object.__dir__(obj))


async def test_a_connection_walks_only_the_names_aiosmtpd_looks_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    walked: list[tuple[object, int]] = []
    real = inspect.getmembers

    def recording(obj: object, predicate: Any = None) -> list[tuple[str, Any]]:
        members = real(obj, predicate)
        walked.append((obj, len(members)))
        return members

    monkeypatch.setattr(inspect, "getmembers", recording)  # what aiosmtpd.smtp calls
    async with running_relay(make_settings(tmp_path)) as relay:
        for _ in range(2):
            c = await RawClient.connect(relay.port)
            assert (await c.cmd("EHLO client.test")).startswith("250")
            # HELP reads aiosmtpd's syntax text off the (wrapped) command table
            assert "NOOP [ignored]" in await c.cmd("HELP NOOP")
            assert (await c.cmd("NOOP")).startswith("250")
            await c.close()
    protocols = [obj for obj, _ in walked if isinstance(obj, RelaySMTP)]
    handlers = [obj for obj, _ in walked if isinstance(obj, Handler)]
    assert len(protocols) == 2 and len(handlers) == 2  # once each per connection
    for obj, count in walked:
        wanted = [n for n in _full_names(obj) if n.startswith(INTROSPECTED)]
        assert count == len(wanted)  # nothing else walked ...
        assert len(_full_names(obj)) > 2 * count  # ... where the full walk is much longer


async def test_the_tables_aiosmtpd_builds_are_those_of_the_full_walk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[RelaySMTP] = []
    real = inspect.getmembers

    def keeping(obj: object, predicate: Any = None) -> list[tuple[str, Any]]:
        if isinstance(obj, RelaySMTP):
            seen.append(obj)
        return real(obj, predicate)

    monkeypatch.setattr(inspect, "getmembers", keeping)
    async with running_relay(make_settings(tmp_path)) as relay:
        c = await RawClient.connect(relay.port)
        assert (await c.cmd("EHLO client.test")).startswith("250")
        await c.close()
    conn = seen[0]
    handler = conn.event_handler
    assert set(conn._smtp_methods) == {
        n.removeprefix("smtp_") for n in _full_names(conn) if n.startswith("smtp_")
    }
    assert set(conn._handle_hooks) == {
        n.removeprefix("handle_") for n in _full_names(handler) if n.startswith("handle_")
    }
    auth = {n for obj in (conn, handler) for n in _full_names(obj) if n.startswith("auth_")}
    assert {f"auth_{m}" for m in conn._auth_methods} == auth
    assert conn._ehlo_hook_ver == "new"


def test_the_ehlo_hook_signature_is_worked_out_once() -> None:
    # inspect.signature returns a function's own __signature__ without parsing it again
    assert "__signature__" in vars(Handler.handle_EHLO)
    assert len(inspect.signature(Handler().handle_EHLO).parameters) == 5


def test_junk_command_wrappers_are_made_once_per_command() -> None:
    """One wrapper function per junk command for every connection (each binds it to
    itself, so the count stays per connection), carrying aiosmtpd's HELP text."""
    noop = RelaySMTP.smtp_NOOP
    assert _junk_counted(noop) is _junk_counted(noop)
    assert _junk_counted(noop).__smtp_syntax__ == noop.__smtp_syntax__  # type: ignore[attr-defined]

"""Headless Chromium (Debian's `chromium` package) for checking lab reports in a real
browser, and a loopback HTTP server to serve them from.

Chromium runs with the flags this kind of machine needs: headless, no sandbox (the tests
run as root), no GPU, and no background networking, component updates, sync or QUIC, so
it never tries to reach the (closed) network; each run gets a fresh profile directory.
Used by tests/test_lab_browser.py and bench/lab_html.py.
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import shutil
import struct
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def command(binary: str, profile: Path, *args: str) -> list[str]:
    return [binary, *FLAGS, f"--user-data-dir={profile}", *args]


def environment() -> dict[str, str]:
    """The environment without libfaketime (`make unit-future` preloads it everywhere):
    Chromium hangs under it, and a static report page does not need the shifted clock."""
    return {
        k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and not k.startswith("FAKETIME")
    }


def run(binary: str, *args: str, timeout: float = 30.0) -> str:
    """Run Chromium once with a fresh profile; its stdout. Fails on a non-zero exit."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        done = subprocess.run(
            command(binary, Path(profile), *args),
            capture_output=True,
            timeout=timeout,
            check=False,
            env=environment(),
        )
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace")[-2000:]
        raise RuntimeError(f"chromium exited {done.returncode}: {tail}")
    return done.stdout.decode()


def dump_dom(binary: str, url: str, timeout: float = 30.0) -> str:
    """The DOM after the page loaded (scripts it inserted before `load` included)."""
    return run(binary, "--dump-dom", url, timeout=timeout)


def screenshot(binary: str, url: str, path: Path, width: int, height: int) -> None:
    run(binary, f"--window-size={width},{height}", f"--screenshot={path}", url)


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk; ValueError if it is not a PNG."""
    if data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise ValueError("not a PNG file")
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


class _Quiet(SimpleHTTPRequestHandler):
    posted: queue.Queue[tuple[str, bytes]] | None = None

    def log_message(self, format: str, *args: Any) -> None:  # the base class names it so
        pass  # the tests' output stays readable

    def do_POST(self) -> None:
        """A page hands its measurements back (bench/lab_html.py); 404 unless asked for."""
        if self.posted is None:
            self.send_error(404)
            return
        size = int(self.headers.get("Content-Length") or 0)
        self.posted.put((self.path, self.rfile.read(size)))
        self.send_response(204)
        self.end_headers()


@contextlib.contextmanager
def serve(directory: Path, posted: queue.Queue[tuple[str, bytes]] | None = None) -> Iterator[str]:
    """A static HTTP server for ``directory`` on 127.0.0.1 (a free port); its base URL.
    With ``posted``, POST requests put (path, body) there."""
    handler_class = type("Handler", (_Quiet,), {"posted": posted})
    handler = functools.partial(handler_class, directory=str(directory))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class Links(HTMLParser):
    """Every href and src of a document, and every element id."""

    def __init__(self) -> None:
        super().__init__()
        self.targets: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("href", "src") and value is not None:
                self.targets.append(value)
            elif name == "id" and value is not None:
                self.ids.add(value)


def links(document: str) -> Links:
    parser = Links()
    parser.feed(document)
    parser.close()
    return parser

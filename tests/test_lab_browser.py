"""The lab report in a real browser: headless Chromium (Debian's `chromium`, installed by
`make system-deps`) loads a report that the real `relay lab` wrote from
tests/fixtures/lab, served over a loopback HTTP server started here and from file://.

Checked: the page loads with its regime sections and the first rows of its tables; the
inline script pages and filters the message lists from their static files (the state in
the address, as a reader's link would carry it); every href and src of the page, and of
the pages and filters it loaded, resolves on the server (fragments to an element of the
target); a screenshot is a PNG of the window's size. docs/lab/report.png is the same
screenshot, made by `python -m bench.lab_html screenshot` (docs/lab.md).
"""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path
from urllib.parse import urldefrag, urljoin, urlparse

import pytest

from relay.cli.main import main
from tests.support import chromium

FIXTURES = Path(__file__).parent / "fixtures" / "lab"
BINARY = chromium.find_chromium()
pytestmark = pytest.mark.skipif(
    BINARY is None,
    reason="no chromium binary on PATH: `make system-deps` installs Debian's chromium, "
    "which this browser check of the lab report needs",
)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("lab-browser")
    config = tmp / "relay.toml"
    config.write_text('[model]\nenabled = false\n[auth]\nauthserv_id = "mx.lab.example"\n')
    out = tmp / "out"
    args = [
        "lab", "--corpus", str(FIXTURES / "corpus"), "--labels", str(FIXTURES / "labels.tsv"),
        "--set", "test", "--config", str(config), "--no-cache", "--jobs", "1",
        "--out", str(out), "--policy", str(FIXTURES / "policies" / "auth_only.toml"),
        str(FIXTURES / "policies" / "size_only.toml"),
    ]  # fmt: skip
    assert main(args) == 0
    return out


def _dom(url: str) -> str:
    assert BINARY is not None
    return chromium.dump_dom(BINARY, url)


def _table(dom: str, key: str) -> str:
    found = re.search(
        rf'<div class="lab-table" id="t-{key}">(.*?)</div>\s*(?:<h2|<script>|</body)', dom, re.S
    )
    assert found, f"table t-{key} missing from the DOM"
    return found.group(1)


def _shown(dom: str, key: str) -> list[str]:
    """The message ids of the rows the table shows (its first link per row)."""
    body = re.search(r"<tbody>(.*?)</tbody>", _table(dom, key), re.S)
    assert body
    return re.findall(r"<tr><td>[^<]*</td><td><a [^>]*>([^<]*)</a>", body.group(1))


def _where(dom: str, key: str) -> str:
    found = re.search(r'<span class="where">([^<]*)</span>', _table(dom, key))
    assert found
    return found.group(1)


def _check_links(dom: str, page: str) -> int:
    """Every href/src of the DOM resolves on the server; returns how many were checked."""
    seen = chromium.links(dom)
    checked = 0
    fetched: dict[str, str] = {}
    for target in seen.targets:
        url, fragment = urldefrag(urljoin(page, target))
        if urlparse(url).netloc != urlparse(page).netloc:
            raise AssertionError(f"{target}: the report links outside itself")
        if url not in fetched:
            with urllib.request.urlopen(url, timeout=10) as answer:
                assert answer.status == 200, target
                fetched[url] = answer.read().decode("utf-8", errors="replace")
        if fragment and "?" not in fragment:
            ids = seen.ids if url == urldefrag(page)[0] else chromium.links(fetched[url]).ids
            assert fragment in ids, f"{target}: no element with id {fragment!r}"
        checked += 1
    return checked


def _check_table_files(dom: str, base: str) -> int:
    """Every chunk and bitset file the tables' manifests can ask for answers 200."""
    count = 0
    for text in re.findall(
        r'<script type="application/json" class="lab-manifest">(.*?)</script>', dom
    ):
        m = json.loads(text)
        names = [f"c{c}" for c in range(-(-m["n"] // m["chunk"]))]
        names += [f"f{i}-{j}" for i, f in enumerate(m["filters"]) for j in range(len(f["values"]))]
        for name in names:
            with urllib.request.urlopen(f"{base}{m['base']}/{name}.js", timeout=10) as answer:
                assert answer.status == 200
                assert answer.read().startswith(b"LAB.")
            count += 1
    return count


def test_report_loads_and_every_link_resolves(report: Path) -> None:
    with chromium.serve(report) as base:
        page = base + "report.html"
        dom = _dom(page)
        for regime in ("auth_only", "size_only"):
            assert f"<h2>{regime}</h2>" in dom
        assert "<svg" in dom and "Messages on which regimes disagree: 2" in dom
        # The first page of each list, most informative first: the spam one regime let
        # through before the ham both delivered (only to a different degree).
        assert _shown(dom, "dis") == ["spam/mortgage.eml", "ham/personal.eml"]
        assert _shown(dom, "hb1") == ["ham/list-post.eml"]
        assert _where(dom, "dis") == "rows 1 to 2 of 2"
        # The script ran: the filters it reveals are visible.
        assert '<div class="controls">' in _table(dom, "dis")
        assert _check_links(dom, page) >= 8  # plots, report.json, message pages, anchors
        assert _check_table_files(dom, base) == 3 + 10  # chunks + filter values

        # Filters and pages from the address, as a shared link would open them; the
        # bitset and chunk files they loaded are <script src> in the DOM, checked too.
        filtered_url = page + "#t-dis?label=ham"
        filtered = _dom(filtered_url)
        assert _shown(filtered, "dis") == ["ham/personal.eml"]
        assert _where(filtered, "dis") == "rows 1 to 1 of 1 (filtered from 2)"
        assert 'src="tables/dis/f0-1.js"' in filtered and 'src="tables/dis/c0.js"' in filtered
        _check_links(filtered, filtered_url)

        second_url = page + "#t-dis?n=1&p=2"
        second = _dom(second_url)
        assert _shown(second, "dis") == ["ham/personal.eml"]
        assert _where(second, "dis") == "rows 2 to 2 of 2"

        pair_url = page + "#t-hb1?delivered=auth_only&action=quarantine"
        pair = _dom(pair_url)
        assert _shown(pair, "hb1") == ["ham/list-post.eml"]
        _check_links(pair, pair_url)


def test_report_pages_from_a_file_url(report: Path) -> None:
    """Opened straight from disk (no server) the shards still load: <script src> works on
    file://, where fetch() would be refused."""
    dom = _dom((report / "report.html").as_uri() + "#t-dis?label=spam")
    assert _shown(dom, "dis") == ["spam/mortgage.eml"]
    assert _where(dom, "dis") == "rows 1 to 1 of 1 (filtered from 2)"


def test_screenshot_is_a_png_of_the_window(report: Path, tmp_path: Path) -> None:
    assert BINARY is not None
    shot = tmp_path / "report.png"
    with chromium.serve(report) as base:
        chromium.screenshot(BINARY, base + "report.html", shot, 1000, 700)
    data = shot.read_bytes()
    assert chromium.png_size(data) == (1000, 700)
    assert len(data) > 10_000  # something was drawn, not a blank window

"""Paged, filterable message tables for the HTML report, as static files.

A report can list every message of a large corpus (3,958 disagreements when one regime
refuses everything), so its HTML never holds a whole list. Each table is drawn inline
with its first page only; the full list, already ranked by stats.py, is cut into
*chunks* of CHUNK_ROWS rows, and every filter value gets a *bitset* of the rows it keeps.
Both are small JavaScript files under ``tables/<key>/`` that only call ``LAB.rows`` or
``LAB.bits`` with JSON data:

    tables/dis/c0.js      LAB.rows("dis", 0, [[cell, ...], ...])   rows 0..199
    tables/dis/f2-5.js    LAB.bits("dis", "f2-5", "<base64>")       filter 2, value 5

A short inline script (SCRIPT: no eval, no external file) loads them on demand with
``<script src>`` elements, which work from file:// as well as from any HTTP server
(fetch() and XMLHttpRequest are refused on file:// by browsers). Filters combine (AND
of their bitsets, one bit per row), so any selection costs at most one bitset file per
filter and the chunks of the rows on the page; rows keep their rank order. The state
lives in the address (``report.html#t-dis?label=ham&p=2``), so a filtered page can be
linked. Without JavaScript the first page and the pager's counts still show.

Cells are plain text, (text, href) for a link or an action name (coloured); the script
builds the DOM with textContent, never innerHTML, so message ids stay text.
"""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path

PAGE_ROWS = 50  # rows on a page (inline and paged); the reader can pick 10, 50 or 200
CHUNK_ROWS = 200  # rows per chunk file: about 20-40 KB, one or two per unfiltered page
PAGE_SIZES = (10, 50, 200)
TABLES_DIR = "tables"
KINDS = frozenset({"text", "link", "action"})

Cell = str | tuple[str, str]


@dataclass(frozen=True, slots=True)
class Filter:
    """One filter of a table: its values (in display order) and the rows each keeps."""

    name: str  # the address parameter (label, pair, rule, ...)
    title: str
    values: tuple[str, ...]
    members: tuple[tuple[int, ...], ...]  # per value, row indices in rank order

    @classmethod
    def of(
        cls,
        name: str,
        title: str,
        per_row: Sequence[Iterable[str]],
        order: Sequence[str] | None = None,
    ) -> Filter:
        """From each row's values; values no row has are left out."""
        found: dict[str, list[int]] = {}
        for i, values in enumerate(per_row):
            for v in dict.fromkeys(values):
                found.setdefault(v, []).append(i)
        names = [v for v in order if v in found] if order is not None else sorted(found)
        return cls(name, title, tuple(names), tuple(tuple(found[v]) for v in names))


@dataclass(frozen=True, slots=True)
class Table:
    key: str  # [a-z0-9]+: element id t-<key> and folder tables/<key>
    title: str  # the table's accessible name (the heading above it is the caller's)
    note: str  # how the rows are ranked
    head: tuple[str, ...]
    kinds: tuple[str, ...]  # per column, one of KINDS
    rows: Sequence[Sequence[Cell]]
    filters: tuple[Filter, ...] = ()

    def __post_init__(self) -> None:
        if not self.key.isalnum() or not self.key.islower():
            raise ValueError(f"table key {self.key!r}: lower-case letters and digits only")
        if len(self.kinds) != len(self.head) or not set(self.kinds) <= KINDS:
            raise ValueError(f"table {self.key}: one kind per column, from {sorted(KINDS)}")


def _cell_html(kind: str, cell: Cell) -> str:
    if kind == "link" and isinstance(cell, tuple):
        return f"<a href='{escape(cell[1])}'>{escape(cell[0])}</a>"
    text = cell[0] if isinstance(cell, tuple) else cell
    if kind == "action":
        return f"<span class='{outcome_css(text)}'>{escape(text)}</span>"
    return escape(text)


def outcome_css(action: str) -> str:
    if action in ("reject", "tempfail"):
        return "hard"
    return "soft" if action in ("tag", "quarantine") else "pass"


def _where(start: int, shown: int, total: int) -> str:
    if not total:
        return "no rows"
    return f"rows {start + 1} to {start + shown} of {total}"


def _manifest(table: Table) -> str:
    data = {
        "key": table.key,
        "base": f"{TABLES_DIR}/{table.key}",
        "n": len(table.rows),
        "chunk": CHUNK_ROWS,
        "page": PAGE_ROWS,
        "kinds": list(table.kinds),
        "filters": [
            {
                "name": f.name,
                "values": [[v, len(m)] for v, m in zip(f.values, f.members, strict=True)],
            }
            for f in table.filters
        ],
    }
    # Inside <script type="application/json"> only "</script" could end the element
    # early; no "<" survives, so no message id can.
    return json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")


def html(table: Table) -> str:
    """The table with its first page inline, its filters and pager (shown by the script)."""
    first = table.rows[:PAGE_ROWS]
    controls = []
    for i, f in enumerate(table.filters):
        options = "".join(
            f"<option value='{j}'>{escape(v)} ({len(m)})</option>"
            for j, (v, m) in enumerate(zip(f.values, f.members, strict=True))
        )
        controls.append(
            f"<label>{escape(f.title)} <select data-f='{i}'>"
            f"<option value='-1'>any</option>{options}</select></label>"
        )
    sizes = "".join(
        f"<option{' selected' if n == PAGE_ROWS else ''}>{n}</option>" for n in PAGE_SIZES
    )
    controls.append(f"<label>rows per page <select data-n='1'>{sizes}</select></label>")
    head = "".join(f"<th>{escape(h)}</th>" for h in table.head)
    body = "\n".join(
        "<tr>"
        + "".join(f"<td>{_cell_html(k, c)}</td>" for k, c in zip(table.kinds, row, strict=True))
        + "</tr>"
        for row in first
    )
    return "\n".join(
        [
            f"<div class='lab-table' id='t-{table.key}'>",
            f"<p class='rank'>{escape(table.note)}</p>",
            f"<div class='controls' hidden>{' '.join(controls)}</div>",
            f"<table aria-label='{escape(table.title)}'><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table>",
            "<p class='pager'><button type='button' data-go='-1' hidden>previous</button> "
            f"<span class='where'>{_where(0, len(first), len(table.rows))}</span> "
            "<button type='button' data-go='1' hidden>next</button></p>",
            "<noscript><p>Without JavaScript only the first page shows; "
            "<a href='report.json'>report.json</a> holds the full ranked list.</p></noscript>",
            f"<script type='application/json' class='lab-manifest'>{_manifest(table)}</script>",
            "</div>",
        ]
    )


def _bitset(rows: int, members: Iterable[int]) -> str:
    bits = bytearray((rows + 7) // 8)
    for i in members:
        bits[i >> 3] |= 1 << (i & 7)
    return base64.b64encode(bytes(bits)).decode("ascii")


def files(table: Table) -> Iterator[tuple[str, str]]:
    """(path under the report directory, text) of every chunk and bitset of a table."""
    base = f"{TABLES_DIR}/{table.key}"
    key = json.dumps(table.key)
    for c in range(0, len(table.rows), CHUNK_ROWS):
        rows = [list(row) for row in table.rows[c : c + CHUNK_ROWS]]
        data = json.dumps(rows, separators=(",", ":"))
        yield f"{base}/c{c // CHUNK_ROWS}.js", f"LAB.rows({key},{c // CHUNK_ROWS},{data});\n"
    for i, f in enumerate(table.filters):
        for j, members in enumerate(f.members):
            name = f"f{i}-{j}"
            bits = _bitset(len(table.rows), members)
            yield f"{base}/{name}.js", f'LAB.bits({key},"{name}","{bits}");\n'


def write(tables: Sequence[Table], out: Path) -> int:
    """Write every table's files under out/tables (replacing an older run's); returns
    how many files."""
    shutil.rmtree(out / TABLES_DIR, ignore_errors=True)
    count = 0
    for table in tables:
        for path, text in files(table):
            target = out / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="ascii")
            count += 1
    return count


CSS = """
.lab-table .rank{color:#555;font-size:13px;margin:.3em 0}.lab-table .controls{margin:.4em 0}
.lab-table label{margin-right:1em;font-size:14px}.lab-table .pager button{margin:0 .4em}
"""

# One script for every table of the page. It reads each table's manifest (JSON.parse, no
# eval), and on a filter, page or address change loads the bitset and chunk files it
# lacks with <script src>, which each call LAB.bits or LAB.rows; every arrival re-runs
# the table, so the page shown always matches the latest choice.
SCRIPT = """
(function () {
  "use strict";
  var tables = {};
  window.LAB = {
    rows: function (key, c, rows) { var t = tables[key]; if (t) { t.chunks[c] = rows; t.run(); } },
    bits: function (key, name, b64) {
      var t = tables[key]; if (!t) { return; }
      var s = atob(b64), a = new Uint8Array(s.length);
      for (var i = 0; i < s.length; i++) { a[i] = s.charCodeAt(i); }
      t.bits[name] = a; t.run();
    }
  };
  function outcome(a) {
    if (a === "reject" || a === "tempfail") { return "hard"; }
    return (a === "tag" || a === "quarantine") ? "soft" : "pass";
  }
  function Table(root, m) {
    var self = this;
    this.root = root; this.m = m; this.chunks = {}; this.bits = {}; this.asked = {};
    this.sel = m.filters.map(function () { return -1; });
    this.page = 0; this.size = m.page; this.active = false;
    this.selects = root.querySelectorAll("select[data-f]");
    this.sizeSelect = root.querySelector("select[data-n]");
    this.tbody = root.querySelector("tbody");
    this.where = root.querySelector(".where");
    this.buttons = root.querySelectorAll("button[data-go]");
    root.querySelector(".controls").hidden = false;
    Array.prototype.forEach.call(this.selects, function (s) {
      s.addEventListener("change", function () {
        self.sel[+s.dataset.f] = +s.value; self.page = 0; self.start();
      });
    });
    this.sizeSelect.addEventListener("change", function () {
      self.size = +self.sizeSelect.value; self.page = 0; self.start();
    });
    Array.prototype.forEach.call(this.buttons, function (b) {
      b.hidden = false;
      b.addEventListener("click", function () { self.page += +b.dataset.go; self.start(); });
    });
    this.buttons[0].disabled = true;
    this.buttons[1].disabled = m.n <= m.page;
  }
  Table.prototype.start = function () { this.active = true; this.run(); };
  Table.prototype.load = function (name) {
    if (this.asked[name]) { return; }
    this.asked[name] = true;
    var s = document.createElement("script"), where = this.where;
    s.src = this.m.base + "/" + name + ".js";
    s.onerror = function () { where.textContent = "could not load " + s.src; };
    document.head.appendChild(s);
  };
  Table.prototype.run = function () {
    if (!this.active) { return; }
    var m = this.m, sets = [], missing = false, i, j;
    for (i = 0; i < this.sel.length; i++) {
      if (this.sel[i] < 0) { continue; }
      var name = "f" + i + "-" + this.sel[i];
      if (this.bits[name]) { sets.push(this.bits[name]); } else { this.load(name); missing = true; }
    }
    if (missing) { this.where.textContent = "loading..."; return; }
    var idx = null, count = m.n;
    if (sets.length) {
      idx = [];
      for (i = 0; i < m.n; i++) {
        for (j = 0; j < sets.length && (sets[j][i >> 3] & (1 << (i & 7))); j++) { }
        if (j === sets.length) { idx.push(i); }
      }
      count = idx.length;
    }
    var pages = Math.max(1, Math.ceil(count / this.size));
    this.page = Math.min(Math.max(0, this.page), pages - 1);
    var lo = this.page * this.size, hi = Math.min(count, lo + this.size), rows = [];
    for (j = lo; j < hi; j++) {
      var r = idx ? idx[j] : j, c = Math.floor(r / m.chunk);
      if (this.chunks[c]) { rows.push(this.chunks[c][r - c * m.chunk]); }
      else { this.load("c" + c); missing = true; }
    }
    if (missing) { this.where.textContent = "loading..."; return; }
    this.draw(rows);
    this.where.textContent = count ? "rows " + (lo + 1) + " to " + hi + " of " + count +
      (count < m.n ? " (filtered from " + m.n + ")" : "") : "no rows match";
    this.buttons[0].disabled = this.page === 0;
    this.buttons[1].disabled = this.page >= pages - 1;
    this.remember();
  };
  Table.prototype.draw = function (rows) {
    var kinds = this.m.kinds, body = document.createDocumentFragment();
    rows.forEach(function (row) {
      var tr = document.createElement("tr");
      row.forEach(function (cell, k) {
        var td = document.createElement("td"), inner;
        if (kinds[k] === "link" && Array.isArray(cell)) {
          inner = document.createElement("a"); inner.href = cell[1]; inner.textContent = cell[0];
          td.appendChild(inner);
        } else if (kinds[k] === "action") {
          inner = document.createElement("span"); inner.className = outcome(cell);
          inner.textContent = cell; td.appendChild(inner);
        } else { td.textContent = cell; }
        tr.appendChild(td);
      });
      body.appendChild(tr);
    });
    this.tbody.replaceChildren(body);
  };
  Table.prototype.remember = function () {
    var q = new URLSearchParams(), m = this.m, i;
    for (i = 0; i < this.sel.length; i++) {
      if (this.sel[i] >= 0) { q.set(m.filters[i].name, m.filters[i].values[this.sel[i]][0]); }
    }
    if (this.page) { q.set("p", String(this.page + 1)); }
    if (this.size !== m.page) { q.set("n", String(this.size)); }
    var s = q.toString();
    history.replaceState(null, "", "#t-" + m.key + (s ? "?" + s : ""));
  };
  Table.prototype.restore = function (q) {
    var m = this.m, i, j;
    for (i = 0; i < m.filters.length; i++) {
      var want = q.get(m.filters[i].name);
      this.sel[i] = -1;
      for (j = 0; j < m.filters[i].values.length; j++) {
        if (m.filters[i].values[j][0] === want) { this.sel[i] = j; }
      }
      this.selects[i].value = String(this.sel[i]);
    }
    var n = parseInt(q.get("n") || "", 10), p = parseInt(q.get("p") || "", 10);
    this.size = n > 0 && n <= 1000 ? n : m.page;
    if (PAGE_SIZES.indexOf(this.size) >= 0) { this.sizeSelect.value = String(this.size); }
    this.page = p > 0 ? p - 1 : 0;
    this.start();
    this.root.scrollIntoView();
  };
  var PAGE_SIZES = __PAGE_SIZES__;
  function fromAddress() {
    var h = location.hash.slice(1), cut = h.indexOf("?");
    var id = cut < 0 ? h : h.slice(0, cut);
    var t = id.slice(0, 2) === "t-" ? tables[id.slice(2)] : null;
    if (t) { t.restore(new URLSearchParams(cut < 0 ? "" : h.slice(cut + 1))); }
  }
  Array.prototype.forEach.call(document.querySelectorAll(".lab-table"), function (root) {
    var m = JSON.parse(root.querySelector("script.lab-manifest").textContent);
    tables[m.key] = new Table(root, m);
  });
  fromAddress();
  window.addEventListener("hashchange", fromAddress);
})();
""".replace("__PAGE_SIZES__", json.dumps(list(PAGE_SIZES)))

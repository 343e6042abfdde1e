"""What a warm rerun of the lab no longer pays (issue 18, item 7).

The stat index (a tar's members' digests, trusted while the archive's size, mtime and
inode are unchanged; ``rehash`` hashes again), the note that every fact is cached (the
survey skipped), and the undecided regimes decided on a pool of forked processes: each
gives the report of a fresh run.
"""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from relay.errors import CorpusError
from relay.lab import corpus as corpus_module
from relay.lab import decide_pool
from relay.lab import run as run_module
from relay.lab.cache import FactCache
from relay.lab.corpus import load_corpus, sources_from_labels
from relay.lab.run import LabOptions, run_lab
from tests.test_lab_decisions import _figures, _regimes
from tests.test_lab_decisions import _options as _lab_options

FIXTURES = Path(__file__).parent / "fixtures" / "lab"
POLICIES = FIXTURES / "policies"


def _tar(tmp_path: Path) -> Path:
    """The fixture corpus as an uncompressed tar, members named as in labels.tsv."""
    path = tmp_path / "corpus.tar"
    with tarfile.open(path, "w") as tar:
        for f in sorted((FIXTURES / "corpus").rglob("*")):
            if f.is_file():
                tar.add(f, arcname=f.relative_to(FIXTURES / "corpus").as_posix())
    return path


def _counting_reads(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    read_items: list[object] = []
    real = vars(corpus_module)["read"]

    def counted(items: Any) -> Any:
        for item in items:
            if item.span is not None:  # a tar member's bytes read (errors are not)
                read_items.append(item)
            yield from real([item])

    monkeypatch.setattr(corpus_module, "read", counted)
    return read_items


def test_stat_index_spares_hashing_an_unchanged_tar(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = _tar(tmp_path)
    sources = tuple(sources_from_labels(archive, FIXTURES / "labels.tsv", "test"))
    members = sum(1 for s in sources if s.span is not None)
    assert members > len(load_corpus(sources, "x").messages)  # some are not messages
    plain = load_corpus(sources, "x")
    reads = _counting_reads(monkeypatch)
    with FactCache(tmp_path / "cache") as cache:

        def load(trust: bool = True) -> Any:
            reads.clear()
            return load_corpus(
                sources, "x", cache.corpus_index(), cache.stat_index(), trust_stat=trust
            )

        assert load().messages == plain.messages
        assert len(reads) == members
        assert load().messages == plain.messages  # digests and headers from the indexes
        assert reads == []
        assert load(trust=False).messages == plain.messages  # rehash: every member read
        assert len(reads) == members

        # The trust model: same size, same mtime, other bytes: taken as unchanged, and
        # caught when the bytes are read (raw() checks them against the digest).
        st = archive.stat()
        first = plain.messages[0]
        assert first.source.span is not None
        offset, _ = first.source.span
        with archive.open("r+b") as fh:
            fh.seek(offset)
            byte = fh.read(1)
            fh.seek(offset)
            fh.write(b"Y" if byte != b"Y" else b"Z")
        os.utime(archive, ns=(st.st_atime_ns, st.st_mtime_ns))
        trusted = load()
        assert reads == []
        assert [m.digest for m in trusted.messages] == [m.digest for m in plain.messages]
        changed = next(m for m in trusted.messages if m.id == first.id)
        with pytest.raises(CorpusError, match="changed during the run"):
            changed.raw()
        # A new mtime: the index no longer applies, every member is hashed again.
        os.utime(archive, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        again = load()
        assert len(reads) == members
        assert next(m for m in again.messages if m.id == first.id).digest != first.digest


def _options(tmp_path: Path, policies: tuple[Path, ...], out: str, **kw: Any) -> LabOptions:
    return _lab_options(tmp_path, policies, out, cache=True, **kw)


def test_a_survey_that_found_every_fact_is_not_repeated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    auth, size = _regimes(tmp_path)
    cold = run_lab(_options(tmp_path, (auth, size), "cold"))
    surveys: list[int] = []
    real = FactCache.survey

    def counted(self: FactCache, *args: Any, **kw: Any) -> Any:
        surveys.append(1)
        return real(self, *args, **kw)

    monkeypatch.setattr(FactCache, "survey", counted)
    warm = run_lab(_options(tmp_path, (auth, size), "warm"))
    assert surveys  # the first warm run surveys, finds everything and notes it
    surveys.clear()
    again = run_lab(_options(tmp_path, (auth, size), "again"))
    assert surveys == []
    assert _figures(again) == _figures(warm) == _figures(cold)
    keep = ("errors", "stateful", "computed", "messages_computed", "messages_from_cache")
    assert {k: again["facts"][k] for k in keep} == {k: warm["facts"][k] for k in keep}
    # Another regime set reads other facts: another note, so a survey again.
    run_lab(_options(tmp_path, (auth,), "auth"))
    assert surveys


def test_undecided_regimes_decided_on_the_pool_as_on_the_driver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    auth, size = _regimes(tmp_path)
    monkeypatch.setattr(decide_pool, "MIN_POOLED", 0)
    pools: list[dict[str, int]] = []
    real = vars(run_module)["decide_missing"]

    def spied(*args: Any) -> Any:
        pools.append(dict(got := real(*args)))
        return got

    monkeypatch.setattr(run_module, "decide_missing", spied)
    pooled = run_lab(_options(tmp_path, (auth, size), "pooled", jobs=2))
    assert pooled["evaluation"] == {
        "auth_only": {"evaluated": 6, "from_cache": 0},
        "size_only": {"evaluated": 6, "from_cache": 0},
    }
    assert pools == [{"auth_only": 6, "size_only": 6}]  # decided in the forked processes
    size.write_text(size.read_text().replace("message_size > 700", "message_size > 1000"))
    rerun = run_lab(_options(tmp_path, (auth, size), "rerun", jobs=2))
    assert pools[1:] == [{"size_only": 6}]
    assert rerun["evaluation"] == {
        "auth_only": {"evaluated": 0, "from_cache": 6},
        "size_only": {"evaluated": 6, "from_cache": 0},
    }
    fresh = run_lab(replace(_options(tmp_path, (auth, size), "fresh"), cache_dir=None))
    assert _figures(rerun) == _figures(fresh)
    lines = {n: (tmp_path / n / "verdicts.jsonl").read_text() for n in ("rerun", "fresh")}
    assert lines["rerun"] == lines["fresh"]
    assert next(r for r in rerun["regimes"] if r["name"] == "size_only")["ham_blocked"]["k"] == 0


def test_verdict_lines_are_the_records_encoded(tmp_path: Path) -> None:
    from relay.lab.diff import verdict_record
    from relay.lab.evaluate import Decision
    from relay.lab.run import VerdictLines

    messages = load_corpus(
        tuple(sources_from_labels(FIXTURES / "corpus", FIXTURES / "labels.tsv", "test")), "x"
    ).messages
    a = Decision("deliver", 0.5, "T1", ("r1",), None, "score 0.5", ("spf",), ())
    b = Decision("reject", 9.0, None, ("r\u00e9", 'q"uote'), "r\u00e9", "forced", (), ("x: y",))
    lines = VerdictLines()
    for i, m in enumerate(messages):
        m = replace(m, id=m.id + '\u00e9"') if i % 2 else m
        for decisions in ({"one": a, "two": b}, {"two": a}, {}):
            expected = json.dumps(verdict_record(m, decisions), separators=(",", ":"))
            assert lines.line(m, decisions) == expected + "\n"


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("extra", ["plain", "long name", "symlink", "unsafe"])
def test_plain_tar_listing_is_tarfiles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: int, extra: str
) -> None:
    """The header-only listing of an uncompressed tar gives tarfile's items, and archives
    it does not handle (long names in GNU or pax form, links) go to tarfile."""
    import io

    from relay import corpus as relay_corpus

    path = tmp_path / "c.tar"
    body = b"From: a@example.org\nSubject: x\n\nhello\n"
    with tarfile.open(path, "w", format=fmt) as tar:
        tar.addfile(tarfile.TarInfo("d"), None)  # a regular empty file
        info = tarfile.TarInfo("dir")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        names = ["dir/a.eml", "dir/\u00e9t\u00e9.eml", "cmds", "dir/.hidden"]
        if extra == "long name":
            names.append("x" * 60 + "/" + "y" * 80 + ".eml")  # ustar: prefix; GNU/pax: long
        if extra == "unsafe":
            names.append("../escape.eml")
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
        if extra == "symlink":
            info = tarfile.TarInfo("link.eml")
            info.type = tarfile.SYMTYPE
            info.linkname = "dir/a.eml"
            tar.addfile(info)
    fast_calls: list[object] = []
    real = vars(relay_corpus)["_ustar_listing"]

    def spied(archive: Path) -> Any:
        fast_calls.append(got := real(archive))
        return got

    monkeypatch.setattr(relay_corpus, "_ustar_listing", spied)
    fast = list(relay_corpus.stream_archive(path, "ham"))
    monkeypatch.setattr(relay_corpus, "_ustar_listing", lambda archive: None)
    slow = list(relay_corpus.stream_archive(path, "ham"))
    assert fast == slow
    assert [i.id for i in fast][:2] == ["d", "dir/a.eml"]
    simple = extra in ("plain", "unsafe") or (extra == "long name" and fmt == tarfile.USTAR_FORMAT)
    if fmt == tarfile.PAX_FORMAT and any(ord(c) > 127 for n in names for c in n):
        simple = False  # a non-ASCII name goes in a pax header
    assert (fast_calls[0] is not None) == simple


@pytest.mark.parametrize("how", ["raises", "dies"])
def test_a_failing_decider_process_stops_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    from relay.errors import RelayError

    auth, size = _regimes(tmp_path)
    monkeypatch.setattr(decide_pool, "MIN_POOLED", 0)

    async def raises(*args: Any) -> None:
        raise ValueError("no decision today")

    def dies(*args: Any) -> None:
        os._exit(3)

    if how == "raises":
        monkeypatch.setattr(decide_pool, "_decide", raises)
    else:
        monkeypatch.setattr(decide_pool, "_worker", dies)
    match = "no decision today" if how == "raises" else r"died \(exit codes \[3, 3\]\)"
    with pytest.raises(RelayError, match=match):
        run_lab(_options(tmp_path, (auth, size), "x", jobs=2))


def test_cli_rehash_hashes_the_tar_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from relay.cli.main import main

    archive = _tar(tmp_path)
    members = sum(
        1 for s in sources_from_labels(archive, FIXTURES / "labels.tsv", "test") if s.span
    )
    config = tmp_path / "relay.toml"
    config.write_text('[model]\nenabled = false\n[auth]\nauthserv_id = "mx.lab.example"\n')
    args = [
        "lab", "--corpus", str(archive), "--labels", str(FIXTURES / "labels.tsv"),
        "--set", "test", "--config", str(config), "--cache", str(tmp_path / "cache"),
        "--jobs", "1", "--no-progress", "--policy", str(POLICIES / "auth_only.toml"),
    ]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    reads = _counting_reads(monkeypatch)
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    # Read again only where a pass needs bytes (none: every fact cached), never to hash.
    assert reads == []
    assert main([*args, "--out", str(tmp_path / "c"), "--rehash"]) == 0
    assert len(reads) == members

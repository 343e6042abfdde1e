"""The lab's decision cache, its streamed evaluation and its bounded fact pages.

On the fixture corpus of test_lab.py (6 readable messages, regimes auth_only and
size_only): a rerun with one regime file changed decides only that regime and reads the
other's decisions back, and its report is the report of a fresh run with no cache.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from relay.config import settings_from_mapping
from relay.lab import cache as cache_module
from relay.lab.cache import BatchReader, Cached, FactCache
from relay.lab.corpus import sources_from_labels
from relay.lab.env import LabEnv
from relay.lab.evaluate import Decision, decision_from_row, decision_row
from relay.lab.run import LabOptions, run_lab

FIXTURES = Path(__file__).parent / "fixtures" / "lab"
POLICIES = FIXTURES / "policies"
# Report keys that describe how a run went rather than what it found.
RUN_ONLY = ("timings", "facts", "evaluation")


def _options(
    tmp_path: Path, policies: tuple[Path, ...], out: str, *, cache: bool, **kw: Any
) -> LabOptions:
    """The fixture corpus under ``policies``, one job unless ``kw`` says otherwise."""
    settings = settings_from_mapping({"model": {"enabled": False}})
    return LabOptions(
        sources=tuple(sources_from_labels(FIXTURES / "corpus", FIXTURES / "labels.tsv", "test")),
        description="fixture",
        policies=policies,
        out=tmp_path / out,
        env=LabEnv(settings=settings, trusted_authserv_ids=("mx.lab.example",)),
        cache_dir=tmp_path / "cache" if cache else None,
        **{"jobs": 1, **kw},
    )


def _figures(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if k not in RUN_ONLY}


def _regimes(tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "regimes"
    folder.mkdir()
    auth = shutil.copy(POLICIES / "auth_only.toml", folder / "auth_only.toml")
    size = shutil.copy(POLICIES / "size_only.toml", folder / "size_only.toml")
    return Path(auth), Path(size)


def test_rerun_with_one_changed_regime_decides_only_that_regime(tmp_path: Path) -> None:
    auth, size = _regimes(tmp_path)
    first = run_lab(_options(tmp_path, (auth, size), "first", cache=True))
    assert first["evaluation"] == {
        "auth_only": {"evaluated": 6, "from_cache": 0},
        "size_only": {"evaluated": 6, "from_cache": 0},
    }
    warm = run_lab(_options(tmp_path, (auth, size), "warm", cache=True))
    assert warm["evaluation"] == {
        "auth_only": {"evaluated": 0, "from_cache": 6},
        "size_only": {"evaluated": 0, "from_cache": 6},
    }
    assert _figures(warm) == _figures(first)
    assert warm["facts"]["errors"] == first["facts"]["errors"]  # counted from the cache

    # list-post.eml (761 bytes, ham) was quarantined as "big"; now it is not.
    text = size.read_text()
    size.write_text(text.replace("message_size > 700", "message_size > 1000"))
    rerun = run_lab(_options(tmp_path, (auth, size), "rerun", cache=True))
    assert rerun["evaluation"] == {
        "auth_only": {"evaluated": 0, "from_cache": 6},
        "size_only": {"evaluated": 6, "from_cache": 0},
    }
    size_regime = next(r for r in rerun["regimes"] if r["name"] == "size_only")
    assert size_regime["ham_blocked"]["k"] == 0  # the new file's verdicts, not stale ones

    fresh = run_lab(_options(tmp_path, (auth, size), "fresh", cache=False))
    assert fresh["evaluation"]["size_only"] == {"evaluated": 6, "from_cache": 0}
    assert _figures(rerun) == _figures(fresh)
    on_disk = {
        name: json.loads((tmp_path / name / "report.json").read_text())
        for name in ("rerun", "fresh")
    }
    assert _figures(on_disk["rerun"]) == _figures(on_disk["fresh"])
    lines = {name: (tmp_path / name / "verdicts.jsonl").read_text() for name in ("rerun", "fresh")}
    assert lines["rerun"] == lines["fresh"]
    assert len(lines["fresh"].splitlines()) == 6


def test_changing_a_regime_back_reuses_its_earlier_decisions(tmp_path: Path) -> None:
    auth, size = _regimes(tmp_path)
    original = size.read_text()
    run_lab(_options(tmp_path, (auth, size), "a", cache=True))
    size.write_text(original.replace("message_size > 700", "message_size > 1000"))
    run_lab(_options(tmp_path, (auth, size), "b", cache=True))
    size.write_text(original)
    back = run_lab(_options(tmp_path, (auth, size), "c", cache=True))
    # Keyed by the file's content, not its path or time: both versions stay cached.
    assert back["evaluation"]["size_only"] == {"evaluated": 0, "from_cache": 6}
    assert next(r for r in back["regimes"] if r["name"] == "size_only")["ham_blocked"]["k"] == 1


def test_a_new_fact_version_invalidates_the_cached_decisions(tmp_path: Path) -> None:
    auth, size = _regimes(tmp_path)
    options = _options(tmp_path, (auth, size), "a", cache=True)
    run_lab(options)
    registry = options.env.registry()
    spec = registry["message_size"]
    bumped = dataclasses.replace(spec, version=spec.version + 1)

    class Env(LabEnv):
        def registry(self) -> Any:
            return type(registry)(bumped if s.name == "message_size" else s for s in registry)

    env = Env(settings=options.env.settings, trusted_authserv_ids=("mx.lab.example",))
    again = run_lab(dataclasses.replace(options, env=env, out=tmp_path / "b"))
    # size_only reads message_size: decided again; auth_only does not: read back.
    assert again["evaluation"]["size_only"] == {"evaluated": 6, "from_cache": 0}
    assert again["evaluation"]["auth_only"] == {"evaluated": 0, "from_cache": 6}


def test_decision_rows_round_trip() -> None:
    d = Decision(
        action="quarantine",
        score=0.7 + 0.1,
        tier="T1",
        rules=("a", "b"),
        forced_by=None,
        reason="score 0.8",
        facts=("spf", "message_size"),
        skipped=("c: missing fact",),
        matched=("a", "b", "z"),
        bands=(((1.0, "tag"), (5.0, "quarantine")), ((2.5, "reject"),)),
    )
    row = json.loads(json.dumps(decision_row(d)))
    assert decision_from_row(row) == d
    unprobed = dataclasses.replace(d, matched=None, bands=())
    assert decision_from_row(json.loads(json.dumps(decision_row(unprobed)))) == unprobed


def test_fact_pages_only_for_the_first_rows_of_each_list(tmp_path: Path) -> None:
    policies = (POLICIES / "auth_only.toml", POLICIES / "size_only.toml")
    every = run_lab(_options(tmp_path, policies, "every", cache=True))
    options = dataclasses.replace(_options(tmp_path, policies, "one", cache=True), pages=1)
    one = run_lab(options)
    assert [d["id"] for d in one["disagreements"]] == [d["id"] for d in every["disagreements"]]
    assert len(one["disagreements"]) == 2
    linked = [d for d in one["disagreements"] if d["facts"] is not None]
    assert [d["rank"] for d in linked] == [1]
    assert one["disagreements"][1]["facts"] is None
    # Every figure still counts every message.
    for a, b in zip(one["regimes"], every["regimes"], strict=True):
        assert {k: v for k, v in a.items() if k != "ham_blocks"} == {
            k: v for k, v in b.items() if k != "ham_blocks"
        }
    pages: dict[str, Any] = {}
    for shard in (tmp_path / "one" / "messages").glob("*.json"):
        pages.update(json.loads(shard.read_text()))
    every_pages: dict[str, Any] = {}
    for shard in (tmp_path / "every" / "messages").glob("*.json"):
        every_pages.update(json.loads(shard.read_text()))
    listed = {d["id"] for d in linked} | {
        b["id"] for r in one["regimes"] for b in r["ham_blocks"] if b["facts"] is not None
    }
    assert {p["id"] for p in pages.values()} == listed
    assert len(every_pages) > len(pages)
    for anchor, page in pages.items():
        assert page == every_pages[anchor]  # the same page, from the caches
    # The unlinked row is plain text in the HTML and the Markdown.
    unlinked = one["disagreements"][1]
    html = (tmp_path / "one" / "report.html").read_text()
    md = (tmp_path / "one" / "report.md").read_text()
    assert f"| {unlinked['id']} |" in md and f"[{unlinked['id']}](" not in md
    assert f">{unlinked['id']}</a>" not in html and unlinked["id"] in html
    # verdicts.jsonl stays complete.
    assert len((tmp_path / "one" / "verdicts.jsonl").read_text().splitlines()) == 6


def test_batch_reader_holds_one_batch_of_facts(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(cache_module, "BATCH", 2)
    digests = [f"{i:064x}" for i in range(5)]
    with FactCache(tmp_path) as cache:
        for i, d in enumerate(digests):
            cache.store(d, {"n": Cached(i)}, {"n": 1}, "ctx")
        cache.commit()
        reader = BatchReader(cache, digests, {"n": 1}, ("ctx",))
        calls: list[int] = []
        load = cache.load_batch

        def counted(part: Any, *args: Any, **kwargs: Any) -> Any:
            calls.append(len(part))
            return load(part, *args, **kwargs)

        monkeypatch.setattr(cache, "load_batch", counted)
        assert [reader[d]["n"].value for d in digests] == [0, 1, 2, 3, 4]
        assert calls == [2, 2, 1]  # in order: one query per batch
        assert len(reader._batch) <= 2
        assert reader[digests[0]]["n"].value == 0  # out of order still works
        assert "f" * 64 not in reader


def test_cli_pages_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from relay.cli.main import main

    config = tmp_path / "relay.toml"
    config.write_text('[model]\nenabled = false\n[auth]\nauthserv_id = "mx.lab.example"\n')
    args = [
        "lab", "--corpus", str(FIXTURES / "corpus"), "--labels", str(FIXTURES / "labels.tsv"),
        "--set", "test", "--config", str(config), "--cache", str(tmp_path / "cache"),
        "--jobs", "1", "--no-progress", "--policy", str(POLICIES / "auth_only.toml"),
        str(POLICIES / "size_only.toml"),
    ]  # fmt: skip
    counts: dict[str, int] = {}
    for pages in ("1", "0"):
        out = tmp_path / pages
        assert main([*args, "--out", str(out), "--pages", pages]) == 0
        report = json.loads((out / "report.json").read_text())
        assert report["pages"] == (1 if pages == "1" else None)
        counts[pages] = sum(1 for d in report["disagreements"] if d["facts"] is not None)
    assert counts == {"1": 1, "0": 2}  # 0: every listed message has its page
    assert main([*args, "--out", str(tmp_path / "bad"), "--pages", "-1"]) == 2
    assert "--pages" in capsys.readouterr().err


def test_local_pass_one_runs_in_chunks_and_keeps_no_outcomes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from relay.lab import engine
    from relay.lab.compute import parallel_pass as real_pass

    policies = (POLICIES / "auth_only.toml", POLICIES / "size_only.toml")
    whole = run_lab(_options(tmp_path / "a", policies, "out", cache=True))
    calls: list[int] = []
    returned: list[dict[str, Any]] = []
    real_first = engine.first_pass

    def counted(env: Any, items: Any, jobs: int, progress: Any) -> Any:
        calls.append(len(items))
        return real_pass(env, items, jobs, progress)

    def first(*args: Any) -> Any:
        got = real_first(*args)
        returned.append(got)
        return got

    monkeypatch.setattr(engine, "LOCAL_CHUNK", 4)
    monkeypatch.setattr(engine, "parallel_pass", counted)
    monkeypatch.setattr("relay.lab.run.first_pass", first)
    chunked = run_lab(_options(tmp_path / "b", policies, "out", cache=True))
    assert calls == [4, 2]  # 6 messages, 4 a chunk
    assert all(not c.outcomes for got in returned for c in got.values())  # all in the cache
    assert chunked["facts"]["messages_computed"] == 6
    assert _figures(chunked) == _figures(whole)


def test_corpus_index_spares_parsing_headers_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from relay.lab import corpus as corpus_module
    from relay.lab.corpus import load_corpus

    sources = tuple(sources_from_labels(FIXTURES / "corpus", FIXTURES / "labels.tsv", "test"))
    plain = load_corpus(sources, "x")
    parsed: list[bytes] = []
    real = corpus_module._headers

    def counted(raw: bytes) -> Any:
        parsed.append(raw)
        return real(raw)

    monkeypatch.setattr(corpus_module, "_headers", counted)
    with FactCache(tmp_path) as cache:
        first = load_corpus(sources, "x", cache.corpus_index())
        assert len(parsed) == 6
        again = load_corpus(sources, "x", cache.corpus_index())
        assert len(parsed) == 6  # every header value read back from the index
        for got in (first, again):
            assert got.messages == plain.messages  # ids, digests, times, envelopes, peers
            assert got.unreadable == plain.unreadable
        monkeypatch.setattr(corpus_module, "index_version", lambda: "other code")
        load_corpus(sources, "x", cache.corpus_index())
        assert len(parsed) == 12  # other deriving code: parsed again


def test_survey_counts_each_fact_once_across_contexts(tmp_path: Path) -> None:
    """A stateful fact can have a row in both contexts (an error found in pass 1, then
    pass 2's value): it counts once, and pass 1's error only when the first context is
    asked for errors."""
    digest = "ab" * 32
    with FactCache(tmp_path) as cache:
        cache.store(
            digest, {"a": Cached(1), "s": Cached(error="no sender")}, {"a": 1, "s": 1}, "env"
        )
        cache.store(digest, {"s": Cached(3)}, {"a": 1, "s": 1}, "order")
        cache.store(digest, {"old": Cached(error="x")}, {"old": 0}, "env")  # another version
        cache.commit()
        got = cache.survey([digest, "cd" * 32], {"a": 1, "s": 1, "old": 1}, ["env", "order"])
        assert got == {digest: (2, ("s",))}
        assert cache.survey([digest], {"a": 1, "s": 1}, ["order", "env"]) == {digest: (2, ())}

"""corpus.py: the one reader of labelled corpora (labels files, boxes, tar archives)."""

from __future__ import annotations

import io
import mailbox
import tarfile
from pathlib import Path
from typing import Literal

import pytest

from relay import corpus
from relay.corpus import Item
from relay.errors import CorpusError

MSG = b"From: a@x.example\nDate: Mon, 2 Sep 2002 10:00:00 +0000\nSubject: %d\n\nbody\n"


def _tar(path: Path, members: dict[str, bytes], mode: Literal["w:gz", "w:bz2"]) -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("spam/link")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
    return path


@pytest.mark.parametrize(("suffix", "mode"), [(".tar.gz", "w:gz"), (".tar.bz2", "w:bz2")])
def test_archive_source_is_streamed_without_extraction(
    tmp_path: Path, suffix: str, mode: Literal["w:gz", "w:bz2"]
) -> None:
    members = {f"spam/{i}.eml": MSG % i for i in range(3)}
    members["spam/cmds"] = b"mv a b\n"
    archive = _tar(tmp_path / f"spam{suffix}", members, mode)
    items = corpus.read_source(archive, "spam")
    assert [i.id for i in items] == ["spam/0.eml", "spam/1.eml", "spam/2.eml"]  # no cmds, link
    assert [i.load() for i in items] == [MSG % i for i in range(3)]
    assert all(i.set == "train" and i.label == "spam" for i in items)
    assert sorted(p.name for p in tmp_path.iterdir()) == [archive.name]  # nothing extracted
    assert corpus.message_time(items[0].load()) == 1030960800.0


def test_archive_member_climbing_out_is_refused(tmp_path: Path) -> None:
    archive = _tar(
        tmp_path / "evil.tar.gz",
        {"ok/1.eml": MSG % 1, "../x": MSG % 2, "/etc/cron.d/y": MSG % 3},
        "w:gz",
    )
    items = corpus.read_source(archive, "ham")
    read = dict((i.id, data) for i, data in corpus.read(items))
    assert read["ok/1.eml"] == MSG % 1
    assert str(read["../x"]).startswith("refused: unsafe member name '../x'")
    assert "path traversal" in str(read["/etc/cron.d/y"])
    with pytest.raises(CorpusError, match=r"\.\./x: refused: unsafe member name"):
        corpus.load_all(items)
    assert not (tmp_path.parent / "x").exists()


def test_archive_member_over_the_size_limit_is_not_read(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "big.tar.bz2", {"a.eml": MSG % 1, "b.eml": b"x" * 5000}, "w:bz2")
    items = list(corpus.stream_archive(archive, "spam", limit=1000))
    assert items[0].load() == MSG % 1
    assert items[1].data is None and items[1].error == "refused: member is 5000 bytes, over 1000"


def test_labels_file_over_an_archive_root(tmp_path: Path) -> None:
    """modern-dev's layout: labels.tsv paths are relative to the archive's root."""
    archive = _tar(tmp_path / "c.tar.gz", {"c/ham/1.eml": MSG % 1, "c/spam/2.eml": MSG % 2}, "w:gz")
    labels = tmp_path / "labels.tsv"
    labels.write_text(
        "relative_path\tlabel\nc/spam/2.eml\tspam\nc/ham/1.eml\tham\nc/ham/9.eml\tham\n"
    )
    items = corpus.read_labels(archive, labels)
    assert [(i.id, i.label, i.set) for i in items] == [
        ("c/spam/2.eml", "spam", "train"),  # no set column: all in set "train"
        ("c/ham/1.eml", "ham", "train"),
        ("c/ham/9.eml", "ham", "train"),
    ]
    assert items[0].load() == MSG % 2
    with pytest.raises(CorpusError, match=r"labels\.tsv:4: c/ham/9\.eml: cannot read: not a"):
        items[2].load()
    assert corpus.read_labels(archive, labels, "test") == []
    # An archive item listed without its bytes is found by streaming again.
    assert Item("c/ham/1.eml", "ham", archive, key="c/ham/1.eml").load() == MSG % 1


def test_ids_are_paths_relative_to_the_corpus_root(tmp_path: Path) -> None:
    (tmp_path / "ham" / "sub").mkdir(parents=True)
    (tmp_path / "ham" / "sub" / "1.eml").write_bytes(MSG % 1)
    box = mailbox.mbox(tmp_path / "spam.mbox", create=True)
    box.add(MSG % 2)
    box.close()
    assert [i.id for i in corpus.read_source(tmp_path / "ham", "ham")] == ["ham/sub/1.eml"]
    assert [i.id for i in corpus.read_source(tmp_path / "spam.mbox", "spam")] == ["spam.mbox#0"]
    labels = tmp_path / "l.tsv"
    labels.write_text("ham/sub/1.eml\tham\n")
    [listed] = corpus.read_labels(tmp_path, labels)
    assert listed.id == "ham/sub/1.eml" and listed.load() == MSG % 1


def test_unreadable_archive_is_a_corpus_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"not a tar")
    with pytest.raises(CorpusError, match=r"bad\.tar\.gz"):
        corpus.read_source(bad, "spam")

"""lab/corpus.py: a CorpusMessage reads its bytes again when a pass needs them, from a
file or a member of an uncompressed tar, and fails loudly when they changed."""

from __future__ import annotations

import hashlib
import io
import mailbox
import tarfile
from pathlib import Path

import pytest

from relay import corpus
from relay.errors import CorpusError
from relay.lab.corpus import CorpusMessage, load_corpus

MSG = b"From: a@x.example\nDate: Mon, 2 Sep 2002 10:00:%02d +0000\nSubject: %d\n\nbody %d\n"


def _messages(n: int) -> dict[str, bytes]:
    return {f"spam/{i}.eml": MSG % (i, i, i) for i in range(n)}


def _tar(path: Path, members: dict[str, bytes], mode: str) -> Path:
    with tarfile.open(path, mode) as tar:  # type: ignore[call-overload]
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _by_id(messages: tuple[CorpusMessage, ...]) -> dict[str, CorpusMessage]:
    return {m.id: m for m in messages}


def test_uncompressed_tar_members_are_listed_by_offset_and_reread(tmp_path: Path) -> None:
    members = _messages(3)
    archive = _tar(tmp_path / "spam.tar", members, "w")
    items = corpus.read_source(archive, "spam")
    assert all(i.data is None and i.span is not None for i in items)  # no bytes held
    got = _by_id(load_corpus(items, "t").messages)
    assert {k: m.raw() for k, m in got.items()} == members
    assert all(m.source.data is None for m in got.values())
    assert all(m.digest == hashlib.sha256(members[k]).hexdigest() for k, m in got.items())
    # Training reads the same members through the same listing.
    assert [i.data for i in corpus.load_all(items)] == [members[i.id] for i in items]


def test_labels_file_over_an_uncompressed_tar_rereads_by_offset(tmp_path: Path) -> None:
    members = _messages(2)
    archive = _tar(tmp_path / "c.tar", members, "w")
    labels = tmp_path / "labels.tsv"
    labels.write_text("".join(f"{name}\tspam\n" for name in members))
    items = corpus.read_labels(archive, labels)
    assert all(i.span is not None for i in items)
    got = _by_id(load_corpus(items, "t").messages)
    assert {k: m.raw() for k, m in got.items()} == members


def test_compressed_tar_members_keep_their_bytes(tmp_path: Path) -> None:
    # Reading one member again would mean decompressing from the start: they are held.
    members = _messages(2)
    archive = _tar(tmp_path / "spam.tar.gz", members, "w:gz")
    got = _by_id(load_corpus(corpus.read_source(archive, "spam"), "t").messages)
    assert all(m.source.data is not None for m in got.values())
    assert {k: m.raw() for k, m in got.items()} == members


def test_mbox_messages_keep_their_bytes(tmp_path: Path) -> None:
    # Finding one message again means indexing the whole mbox: they are held.
    box = mailbox.mbox(tmp_path / "spam.mbox")
    for data in _messages(2).values():
        box.add(data)
    box.close()
    got = load_corpus(corpus.read_source(tmp_path / "spam.mbox", "spam"), "t").messages
    assert [m.source.data for m in got] == [m.raw() for m in got]
    assert sorted(m.raw() for m in got) == sorted(_messages(2).values())


def test_directory_messages_are_reread_from_their_files(tmp_path: Path) -> None:
    box = tmp_path / "spam"
    box.mkdir()
    for name, data in _messages(3).items():
        (tmp_path / name).write_bytes(data)
    got = _by_id(load_corpus(corpus.read_source(box, "spam"), "t").messages)
    assert all(m.source.data is None for m in got.values())
    assert {k: m.raw() for k, m in got.items()} == _messages(3)
    assert got["spam/1.eml"].to_message().raw == (MSG % (1, 1, 1)).replace(b"\n", b"\r\n")


def test_file_changed_after_listing_fails_naming_it(tmp_path: Path) -> None:
    box = tmp_path / "spam"
    box.mkdir()
    for name, data in _messages(2).items():
        (tmp_path / name).write_bytes(data)
    got = _by_id(load_corpus(corpus.read_source(box, "spam"), "t").messages)
    (box / "1.eml").write_bytes(b"From: b@y.example\nSubject: other\n\nchanged\n")
    with pytest.raises(CorpusError, match=r"spam/1\.eml.*changed during the run") as exc:
        got["spam/1.eml"].to_message()
    assert str(box / "1.eml") in str(exc.value)
    assert got["spam/0.eml"].raw() == MSG % (0, 0, 0)  # the others still read
    (box / "0.eml").unlink()
    with pytest.raises(CorpusError, match=r"0\.eml.*cannot read.*during the run"):
        got["spam/0.eml"].raw()


def test_tar_rewritten_after_listing_fails_naming_it(tmp_path: Path) -> None:
    members = _messages(2)
    archive = _tar(tmp_path / "spam.tar", members, "w")
    got = _by_id(load_corpus(corpus.read_source(archive, "spam"), "t").messages)
    # Same names and sizes, so the same offsets: only the digest can tell.
    _tar(archive, {k: v.replace(b"body", b"BODY") for k, v in members.items()}, "w")
    with pytest.raises(CorpusError, match=r"spam/0\.eml.*spam\.tar changed during the run"):
        got["spam/0.eml"].raw()
    _tar(archive, {"spam/0.eml": b"x"}, "w")  # shorter: the offset is past the end
    with pytest.raises(CorpusError, match=r"spam/1\.eml.*spam\.tar.*during the run"):
        got["spam/1.eml"].raw()

"""The scale benchmark's synthesiser (bench/bench_labscale.py): deterministic, every
message distinct, labels kept, and the lab reads what it writes."""

from __future__ import annotations

import gzip
import hashlib
import tarfile
from pathlib import Path
from typing import Any

import pytest
from bench.bench_labscale import Base, base_messages, perturb, synthesise, write_corpus

from relay.corpus import stream_archive
from relay.lab.corpus import load_corpus, sources_from_labels
from relay.message import header_time, parse_header_fields, split_header_block, strip_mbox_from

FIXTURES = Path(__file__).parent / "fixtures" / "lab"

HAM = (
    b"From alice@example.org  Thu Aug 22 12:36:23 2002\n"
    b"Return-Path: <alice@example.org>\n"
    b"Received: from mx.example.org (mx.example.org [192.0.2.7])\n"
    b"\tby relay.example.net; Thu, 22 Aug 2002 12:36:16 +0100\n"
    b"From: Alice <alice@example.org>\n"
    b"To: bob@example.net\n"
    b"Message-ID: <old@example.org>\n"
    b"Date: Thu, 22 Aug 2002 12:30:00 +0100\n"
    b"Subject: minutes\n"
    b"Content-Type: text/plain\n"
    b"\n"
    b"The minutes of the meeting are attached below for everyone.\n"
    b"Caf\xe9 at ten, as agreed with the whole team last week.\n"
)
SPAM = (
    b"From: Offers <deals@shop.example>\n"
    b"To: bob@example.net\n"
    b"Subject: cheap\n"
    b"Content-Type: text/plain\n"
    b"Content-Transfer-Encoding: base64\n"
    b"\n"
    b"QnV5IG5vdyBhbmQgc2F2ZSBiaWcgb24gZXZlcnl0aGluZw==\n"
)
BASES = (Base("ham", "train", HAM), Base("spam", "test", SPAM))


def _time(raw: bytes) -> float | None:
    return header_time(parse_header_fields(split_header_block(strip_mbox_from(raw))[0]))


def test_synthesis_is_deterministic_distinct_and_keeps_labels() -> None:
    first = list(synthesise(BASES, 40, seed=3))
    again = list(synthesise(BASES, 40, seed=3))
    assert first == again
    assert list(synthesise(BASES, 40, seed=4)) != first
    assert len({hashlib.sha256(raw).digest() for *_, raw in first}) == 40
    for name, label, set_name, raw in first:
        assert name.startswith(f"syn/{label}/")
        source = HAM if label == "ham" else SPAM
        assert set_name == ("train" if label == "ham" else "test")
        assert (b"base64" in raw) == (b"base64" in source)
    assert {label for _, label, _, _ in first} == {"ham", "spam"}
    times = [t for *_, raw in first if (t := _time(raw)) is not None]
    assert len(times) == 40
    assert times == sorted(times)  # arrival order is corpus time order


def test_perturbation_changes_ids_senders_client_and_keeps_the_rest() -> None:
    out = perturb(HAM, 7, 0, 1136073600.0)
    assert out.startswith(b"From alice.7")  # the envelope sender of the mbox line
    head, _, body = out.partition(b"\n\n")
    assert head.count(b"Message-ID:") == 1 and b"<old@example.org>" not in head
    assert head.count(b"\nDate:") == 1 and b"2002 12:30:00" not in head
    assert b"alice@example.org" not in head  # every sender address perturbed alike
    first_received = head.split(b"\n")[1]
    assert first_received.startswith(b"Received: from mail.")
    assert b"192.0.2.7" in head  # older hops kept
    assert b"Caf\xe9" in body  # bytes outside the perturbed words kept exactly
    spam = perturb(SPAM, 8, 0, 1136073600.0)
    assert spam.endswith(b"\nQnV5IG5vdyBhbmQgc2F2ZSBiaWcgb24gZXZlcnl0aGluZw==\n")  # no spaces


def test_the_lab_reads_the_synthetic_corpus(tmp_path: Path) -> None:
    bases = base_messages(FIXTURES / "corpus", FIXTURES / "labels.tsv")
    assert bases
    disk = write_corpus(bases, 30, tmp_path)
    assert disk["tar_bytes"] == (tmp_path / "corpus.tar").stat().st_size
    assert write_corpus(bases, 30, tmp_path) == disk  # kept, not written again
    with tarfile.open(tmp_path / "corpus.tar") as tar:
        assert len(tar.getnames()) == 30
    sources = sources_from_labels(tmp_path / "corpus.tar", tmp_path / "labels.tsv")
    corpus = load_corpus(sources, "synthetic")
    assert len(corpus.messages) == 30 and not corpus.unreadable
    assert len({m.digest for m in corpus.messages}) == 30
    by_id = {m.id: m.label for m in corpus.messages}
    assert all(by_id[i].startswith(("ham", "spam")) for i in by_id)
    assert all(i.split("/")[1] == label for i, label in by_id.items())
    assert all(m.peer.ip != "127.0.0.1" for m in corpus.messages)  # the new client hop


def test_archive_members_are_read_at_their_own_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found at 100,000 members: reading each with the 64 MiB limit as the size asked
    for left tens of GB of address space behind (MemoryError before any fact ran)."""
    disk = write_corpus(list(BASES), 5, tmp_path)
    assert disk["tar_bytes"] > 0
    asked: list[int] = []
    original = tarfile.TarFile.extractfile

    def extractfile(self: tarfile.TarFile, member: str | tarfile.TarInfo) -> Any:
        handle = original(self, member)
        assert handle is not None
        read = handle.read

        def recording_read(size: int = -1) -> bytes:
            asked.append(size)
            return read(size)

        handle.read = recording_read  # type: ignore[method-assign]
        return handle

    monkeypatch.setattr(tarfile.TarFile, "extractfile", extractfile)
    plain = list(stream_archive(tmp_path / "corpus.tar", "ham"))
    assert not asked and all(i.span and i.data is None for i in plain)  # read by offset later
    packed = tmp_path / "corpus.tar.gz"  # a compressed archive's members are read here
    packed.write_bytes(gzip.compress((tmp_path / "corpus.tar").read_bytes()))
    items = list(stream_archive(packed, "ham"))
    assert len(items) == 5 and all(i.data for i in items)
    assert asked and max(asked) < 4096  # each member's size, never the limit

"""The one reader of labelled corpora, shared by `relay train`, `relay evaluate` and the lab.

A corpus is a list of ``Item``: where one message is (a file, a Maildir or mbox key, or a
member of a tar archive), its label, its set, and how to load its exact bytes. Items come
from

- a labels (split) file: TSV, an optional header row ``relative_path  label  [set]``,
  label ``ham`` or ``spam``; paths are relative to the corpus root, which is a directory
  or a ``.tar``/``.tar.gz``/``.tar.bz2``/``.tar.xz`` archive (read in place: the archive
  is streamed once to list it, nothing is extracted);
- one source per label: a Maildir (has ``cur/``), an mbox file, a directory of message
  files (searched recursively; ``cmds`` and dotfiles skipped), or a tar archive of them.

Decisions (docs/classifier.md, docs/lab.md):

- a row without a set column (or with an empty one) is in set ``train`` (DEFAULT_SET);
  a source given per label is all ``train`` too;
- an id is the message's path relative to the corpus root: the labels row's path; for a
  source, the path under the source's parent (``spam/1.eml``), so a directory and the
  same directory listed in a labels file beside it give the same ids; an archive member
  is its member name (``easy_ham/00001.…``, as if extracted beside the archive); a
  Maildir or mbox message is ``<box name>#<key>`` (the key is not a path).
- a member of an uncompressed tar is listed with where its bytes are (``span``), not the
  bytes, and read again by seeking, so a listing of any size holds no message bytes; a
  compressed archive cannot be read by offset without decompressing it from the start,
  so its members are listed with their bytes.
- archive members are read under a size limit (MAX_MEMBER_BYTES); a member whose name
  is absolute or climbs out with ``..`` is never read: it becomes an item that fails to
  load with a clear reason. Links, devices and directories are skipped.

Loading can fail per item (missing file, oversized member): ``Item.load`` raises
``CorpusError`` and ``read`` yields the reason instead, so the lab can list unreadable
messages while training stops on the first one.

Imports only the value objects and ``relay.message``.
"""

from __future__ import annotations

import csv
import dataclasses
import mailbox
import os
import sys
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

from relay.errors import CorpusError
from relay.message import header_time, parse_header_fields, split_header_block, strip_mbox_from

Label = Literal["ham", "spam"]
LABELS: tuple[Label, ...] = ("ham", "spam")
DEFAULT_SET = "train"
MAX_MEMBER_BYTES = 64 * 1024 * 1024  # far above any message the relay accepts
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz")
SKIPPED_NAMES = frozenset({"cmds"})  # SpamAssassin's list of mv commands


@dataclass(frozen=True, slots=True)
class Item:
    """One labelled message of a corpus, not yet read (members of compressed archives
    come pre-read)."""

    id: str  # path relative to the corpus root (see the module docstring)
    label: Label
    path: Path  # the file itself, or the Maildir / mbox / archive holding it
    key: str | None = None  # Maildir / mbox key or archive member name; None: a plain file
    set: str = DEFAULT_SET
    origin: str = ""  # where it was listed, for errors ("labels.tsv:12")
    data: bytes | None = field(default=None, repr=False, compare=False)
    error: str | None = None  # why it cannot be loaded, known before reading
    span: tuple[int, int] | None = None  # (offset, size) of a member in an uncompressed tar

    @property
    def rereadable(self) -> bool:
        """Whether its bytes can be read again cheaply, alone: a plain file, or a member of
        an uncompressed archive (a Maildir or mbox is opened and indexed whole)."""
        return self.error is None and (self.key is None or self.span is not None)

    def load(self) -> bytes:
        """The exact bytes as stored; CorpusError (naming the item) when unreadable."""
        [(_, data)] = read([self])
        if isinstance(data, str):
            raise CorpusError(self.describe(data))
        return data

    def describe(self, reason: str) -> str:
        where = f"{self.origin}: " if self.origin else ""
        return f"{where}{self.id}: {reason}"


def message_time(raw: bytes) -> float | None:
    """A stored message's own time (``message.header_time``: newest Received date, else
    Date), or None when it has neither."""
    return header_time(parse_header_fields(split_header_block(strip_mbox_from(raw))[0]))


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


# -- labels files ------------------------------------------------------------------------


def read_labels(root: Path, labels: Path, only_set: str | None = None) -> list[Item]:
    """Items of a labels file, in its order; paths relative to ``root`` (a directory or an
    archive). ``only_set``: keep rows of that set (rows without one are DEFAULT_SET)."""
    try:
        with labels.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh, delimiter="\t"))
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise CorpusError(f"{labels}: cannot read labels: {reason}") from None
    items: list[Item] = []
    for lineno, row in enumerate(rows, 1):
        if not row or row[0].startswith("#") or (lineno == 1 and row[0] == "relative_path"):
            continue
        if len(row) < 2 or row[1] not in LABELS:
            raise CorpusError(f"{labels}:{lineno}: expected 'path<TAB>ham|spam[<TAB>set]'")
        set_name = row[2] if len(row) > 2 and row[2] else DEFAULT_SET
        if only_set is not None and set_name != only_set:
            continue
        label: Label = "ham" if row[1] == "ham" else "spam"
        origin = f"{labels.name}:{lineno}"
        items.append(Item(row[0], label, root / row[0], set=set_name, origin=origin))
    if is_archive(root):
        return _from_archive(root, items)
    return items


def _from_archive(archive: Path, items: list[Item]) -> list[Item]:
    """The labels rows' members of ``archive``, read in one streaming pass."""
    wanted = {_member_key(i.id): i for i in items}
    found: dict[str, Item] = {}
    for member in stream_archive(archive, "ham", select=wanted.__contains__):  # row's label
        row = wanted.get(_member_key(member.id))
        if row is not None:
            found[row.id] = dataclasses.replace(
                row,
                path=archive,
                key=member.key,
                data=member.data,
                error=member.error,
                span=member.span,
            )
    missing = f"cannot read: not a member of {archive.name}"
    return [
        found.get(i.id) or dataclasses.replace(i, path=archive, key=i.id, error=missing)
        for i in items
    ]


def _member_key(name: str) -> str:
    return name[2:] if name.startswith("./") else name


# -- sources: Maildir, mbox, directory, archive -------------------------------------------


def read_source(path: Path, label: Label) -> list[Item]:
    """Items of one source holding messages of one label."""
    if path.is_dir() and (path / "cur").is_dir():
        box = mailbox.Maildir(path, factory=None, create=False)
        return [Item(f"{path.name}#{key}", label, path, key=key) for key in sorted(box.keys())]
    if is_archive(path):
        return list(stream_archive(path, label))
    if path.is_file():
        mbox = mailbox.mbox(path, factory=None, create=False)
        try:
            keys = list(mbox.keys())
        finally:
            mbox.close()
        return [Item(f"{path.name}#{k}", label, path, key=str(k)) for k in keys]
    if path.is_dir():
        return [
            Item(f"{path.name}/{p.relative_to(path).as_posix()}", label, p)
            for p in sorted(path.rglob("*"))
            if p.is_file() and _is_message_name(p.name)
        ]
    raise CorpusError(f"{path}: not a Maildir, mbox file, directory or tar archive")


def _is_message_name(name: str) -> bool:
    return name not in SKIPPED_NAMES and not name.startswith(".")


def unsafe_member_name(name: str) -> bool:
    """An absolute member name, or one with a ``..`` component (path traversal)."""
    if not name.startswith(("/", "\\")) and ".." not in name and "\0" not in name:
        return False  # the common case, without building a path (1M names in a corpus)
    pure = PurePosixPath(name.replace("\\", "/"))
    return pure.is_absolute() or ".." in pure.parts or "\0" in name


def stream_archive(
    archive: Path,
    label: Label,
    *,
    limit: int = MAX_MEMBER_BYTES,
    select: Callable[[str], bool] | None = None,
) -> Iterator[Item]:
    """Every message member of a tar archive (those whose name ``select`` accepts), read
    in one streaming pass (``r|*``: no seeking, no extraction). Unsafe names and members
    over ``limit`` bytes are not read: they come out as items carrying the reason. In an
    uncompressed archive a member is not read either: its item has its ``span``."""
    try:
        plain = _uncompressed_tar(archive)
        listed = _ustar_listing(archive) if plain else None
        if listed is not None:
            yield from _listed_items(archive, label, listed, limit, select)
            return
        # An uncompressed tar is listed by seeking from header to header (its members'
        # bytes are not read); a compressed one is streamed.
        with tarfile.open(archive, mode="r:" if plain else "r|*") as tar:
            for member in _members(tar) if plain else tar:
                if not member.isreg() or not _is_message_name(PurePosixPath(member.name).name):
                    continue
                name = _member_key(member.name)
                if select is not None and not select(name):
                    continue
                item = Item(name, label, archive, key=member.name)
                if unsafe_member_name(member.name):
                    reason = f"refused: unsafe member name {member.name!r} (path traversal)"
                    yield dataclasses.replace(item, error=reason)
                elif member.size > limit:
                    reason = f"refused: member is {member.size} bytes, over {limit}"
                    yield dataclasses.replace(item, error=reason)
                elif plain and not member.issparse():  # sparse data is not one run of bytes
                    yield dataclasses.replace(item, span=(member.offset_data, member.size))
                else:
                    handle = tar.extractfile(member)
                    # Exactly the member's size (checked above): read(limit) would allocate
                    # a 64 MiB buffer per member, and over 100,000 members the freed
                    # buffers fragmented the heap into tens of GB of address space.
                    data = handle.read(member.size) if handle is not None else b""
                    yield dataclasses.replace(item, data=data)
    except (OSError, EOFError, tarfile.TarError) as exc:
        raise CorpusError(f"{archive}: unreadable archive: {exc}") from None


def _listed_items(
    archive: Path,
    label: Label,
    listed: list[tuple[str, int, int]],
    limit: int,
    select: Callable[[str], bool] | None,
) -> Iterator[Item]:
    """stream_archive's items from a plain listing of regular members."""
    for member_name, offset, size in listed:
        plain_name = "/." not in member_name and "//" not in member_name
        base = member_name.rsplit("/", 1)[-1] if plain_name else PurePosixPath(member_name).name
        if not _is_message_name(base):
            continue
        name = _member_key(member_name)
        if select is not None and not select(name):
            continue
        if unsafe_member_name(member_name):
            reason = f"refused: unsafe member name {member_name!r} (path traversal)"
            yield Item(name, label, archive, key=member_name, error=reason)
        elif size > limit:
            reason = f"refused: member is {size} bytes, over {limit}"
            yield Item(name, label, archive, key=member_name, error=reason)
        else:
            yield Item(name, label, archive, key=member_name, span=(offset, size))


_REGULAR = (b"0", b"\0", b"7")  # tarfile's REGULAR_TYPES
_DIRECTORY = b"5"


def _ustar_listing(archive: Path) -> list[tuple[str, int, int]] | None:
    """(name, data offset, size) of every regular member of an uncompressed tar made only
    of plain ustar / GNU headers (regular files and directories), read from the headers
    alone, about ten times faster than tarfile (1M members: tens of seconds). None
    for anything else (long names, pax headers, links, sparse files, a bad checksum,
    base-256 sizes): tarfile lists those archives, with its own rules."""
    out: list[tuple[str, int, int]] = []
    encoding = sys.getfilesystemencoding()
    with archive.open("rb") as fh:
        # pread, not mmap: a mapping's touched pages count in the process's memory (the
        # whole archive, with read-ahead), though they are only the page cache.
        fd, offset, end = fh.fileno(), 0, os.fstat(fh.fileno()).st_size
        while offset + 512 <= end:
            header = os.pread(fd, 512, offset)
            if len(header) < 512:
                return None  # shorter than when it was measured: let tarfile say so
            if header.count(0) == 512:
                return out  # end of archive (tarfile stops at the first zero block)
            kind = header[156:157]
            if kind not in _REGULAR and kind != _DIRECTORY:
                return None
            if header[257:263] not in (b"ustar\x00", b"ustar "):
                return None
            try:
                size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
                checksum = int(header[148:156].rstrip(b"\0 ") or b"-1", 8)
            except ValueError:
                return None
            if checksum != sum(header[:148]) + 256 + sum(header[156:]):
                return None  # tarfile also accepts a signed sum: let it decide
            name = _field(header[0:100], encoding)
            prefix = _field(header[345:500], encoding)
            if prefix:
                name = f"{prefix}/{name}"
            if name.endswith("/") and kind in (b"0", b"7"):
                return None  # tarfile: a directory only when AREGTYPE
            if kind == _DIRECTORY or name.endswith("/"):
                offset += 512  # a directory's size is not followed by data
                continue
            out.append((name, offset + 512, size))
            offset += 512 + -(-size // 512) * 512
        return None if offset < end else out  # truncated: let tarfile say so


def _field(raw: bytes, encoding: str) -> str:
    end = raw.find(b"\0")
    return (raw if end < 0 else raw[:end]).decode(encoding, "surrogateescape")


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """Each member of a seekable tar, without the TarFile keeping every TarInfo (about
    half a KiB each: 1,000,000 members would hold hundreds of MB while listing)."""
    while (member := tar.next()) is not None:
        tar.members.clear()  # type: ignore[attr-defined]  # not in the stubs
        yield member


def _uncompressed_tar(archive: Path) -> bool:
    """A POSIX (ustar / GNU) tar stored as is: its members' offsets are file offsets."""
    with archive.open("rb") as fh:
        fh.seek(257)
        return fh.read(5) == b"ustar"


def _read_span(path: Path, span: tuple[int, int]) -> bytes:
    offset, size = span
    with path.open("rb") as fh:
        fh.seek(offset)
        data = fh.read(size)
    if len(data) != size:
        raise CorpusError(f"{path.name} is shorter than when it was listed")
    return data


# -- reading -----------------------------------------------------------------------------


def read(items: Iterable[Item]) -> Iterator[tuple[Item, bytes | str]]:
    """Each item with its bytes, or the reason it cannot be read (``cannot read: …`` /
    ``refused: …``); opens each Maildir / mbox once."""
    boxes: dict[Path, mailbox.Mailbox[mailbox.Message]] = {}
    try:
        for item in items:
            if item.error is not None:
                yield item, item.error
            elif item.data is not None:
                yield item, item.data
            else:
                yield item, _read_one(item, boxes)
    finally:
        for box in boxes.values():
            box.close()


def _read_one(item: Item, boxes: dict[Path, mailbox.Mailbox[mailbox.Message]]) -> bytes | str:
    try:
        if item.key is None:
            return item.path.read_bytes()
        if item.span is not None:
            return _read_span(item.path, item.span)
        if is_archive(item.path):  # an archive item listed without its bytes
            want = _member_key(item.key)
            for member in stream_archive(item.path, item.label, select=want.__eq__):
                if member.span is not None:
                    return _read_span(item.path, member.span)
                return member.error or member.data or b""
            return f"cannot read: not a member of {item.path.name}"
        box = boxes.get(item.path)
        if box is None:
            box = (
                mailbox.Maildir(item.path, factory=None, create=False)
                if item.path.is_dir()
                else mailbox.mbox(item.path, factory=None, create=False)
            )
            boxes[item.path] = box
        key: str | int = int(item.key) if isinstance(box, mailbox.mbox) else item.key
        return box.get_bytes(key)  # type: ignore[arg-type]
    except (OSError, KeyError, ValueError, CorpusError) as exc:
        return f"cannot read: {getattr(exc, 'strerror', None) or exc}"


def load_all(items: Iterable[Item]) -> list[Item]:
    """The items with their bytes loaded (``data``); CorpusError naming the first that
    cannot be read."""
    out: list[Item] = []
    for item, data in read(items):
        if isinstance(data, str):
            raise CorpusError(item.describe(data))
        out.append(item if item.data is not None else dataclasses.replace(item, data=data))
    return out

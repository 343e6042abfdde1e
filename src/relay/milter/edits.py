"""What the pipeline did to the header block, as milter header actions.

The pipeline's stamps only ever prepend fields (ours) and remove fields (forged
Authentication-Results, a sender's X-Spam-*); the body is never touched. So the stamped
message's fields are a run of new fields followed by the original fields in order, some
missing. ``header_edits`` finds that run and the missing fields, and says it as milter
actions: deletions (SMFIR_CHGHEADER with an empty value, by name and occurrence number)
and insertions at the top (SMFIR_INSHEADER index 0), so the message the MTA delivers is
the one the SMTP front door would have delivered, byte for byte, from the first field
the MTA itself wrote on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from relay.message import split_fields, split_header_block
from relay.milter import wire

Field = tuple[bytes, bytes]  # (name, value after the colon, line ends as CRLF)


@dataclass(frozen=True, slots=True)
class Edits:
    """Header changes for one message: fields to delete and fields to insert on top."""

    deleted: tuple[tuple[str, int], ...]  # (name, 1-based occurrence among that name)
    inserted: tuple[Field, ...]  # in the order they appear in the stamped message

    def packets(self) -> list[bytes]:
        """Deletions first, highest occurrence first per name, so an earlier deletion
        never renumbers a later one; then insertions bottom-up at index 0, so they end in
        the stamped order."""
        out = [
            wire.change_header(index, name, b"")
            for name, index in sorted(self.deleted, key=lambda d: (d[0].lower(), -d[1]))
        ]
        for name, value in reversed(self.inserted):
            out.append(wire.insert_header(0, name.decode("ascii"), milter_value(value)))
        return out


def milter_value(value: bytes) -> bytes:
    """A field value as a milter header action carries it: no final line end, folded
    lines joined by LF (the MTA writes its own line ends)."""
    if value.endswith(b"\r\n"):
        value = value[:-2]
    return value.replace(b"\r\n", b"\n")


def header_edits(original: Sequence[Field], stamped_raw: bytes) -> Edits:
    """The edits that turn ``original`` into the header block of ``stamped_raw``."""
    head, _ = split_header_block(stamped_raw)
    final = split_fields(head).fields
    missing: list[int] = []
    j = len(final) - 1
    for i in range(len(original) - 1, -1, -1):
        if j >= 0 and final[j] == original[i]:
            j -= 1
        else:
            missing.append(i)
    inserted = tuple(final[: j + 1])  # what is left above the matched run is ours
    deleted: list[tuple[str, int]] = []
    for i in missing:
        name = original[i][0].decode("ascii")
        occurrence = sum(1 for n, _ in original[: i + 1] if n.lower() == original[i][0].lower())
        deleted.append((name, occurrence))
    return Edits(tuple(deleted), inserted)

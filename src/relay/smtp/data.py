"""Reading DATA: the lines up to <CRLF>.<CRLF>, dot-unstuffed into one buffer.

aiosmtpd's own loop keeps each line as a bytearray of its own and joins them at the end:
a 25 MB message held about three times its size while it was read. Here every line is
appended to one ``BytesIO``, whose buffer grows in place and becomes the message bytes
without a copy. The limits and replies are aiosmtpd's: a line over the line limit is 500,
more than the size limit 552, both answered after the end of data. A third refusal is
ours: no room in the memory budget for a large message (``budget.py``), 451.

Once a message is refused, the rest is skipped in blocks up to the exact end of data a
line reader would find (the first ``.<CRLF>`` that starts a line), so the stream stays in
step at a small fraction of the CPU that reading it line by line costs.
"""

from __future__ import annotations

import asyncio
import enum
import io
from collections.abc import Callable
from dataclasses import dataclass

from relay.smtp.smuggling import DataLines

END_OF_DATA = b".\r\n"


class DataEnd(enum.Enum):
    OK = "ok"
    TOO_LONG = "too long"  # a line over the limit: 500
    TOO_MUCH = "too much"  # over max_message_size: 552
    NO_ROOM = "no room"  # a large message with no room in the budget: 451


@dataclass(frozen=True, slots=True)
class DataRead:
    end: DataEnd
    data: bytes  # the message, dot-unstuffed; b"" unless OK
    size: int  # bytes read before the end or the refusal (dots included)


async def read_data(
    reader: asyncio.StreamReader,
    *,
    line_limit: int,
    size_limit: int,
    ceiling: int,
    grow: Callable[[], int | None],
    watch: DataLines,
) -> DataRead:
    """Read one DATA phase from ``reader`` (after the 354).

    ``ceiling``: bytes the message may reach before ``grow`` is asked for more room; it
    answers the new ceiling or None (no room). ``watch`` sees every line that holds a
    bare CR or LF (smuggling, normalisation). The reader's limit is the line limit, so a
    longer line arrives as a LimitOverrunError."""
    out = io.BytesIO()
    size = 0
    ceiling = min(ceiling, size_limit)  # past either, the loop stops to look
    while True:
        try:
            line = await reader.readuntil(b"\r\n")
        except asyncio.LimitOverrunError as exc:
            block = await reader.read(exc.consumed)  # part of a line too long to keep
            await skip_rest(reader, (b"\r\n" + block[-2:])[-2:])
            return DataRead(DataEnd.TOO_LONG, b"", size + len(block))
        if line == END_OF_DATA:
            break
        size += len(line)
        end: DataEnd | None = None
        if size > ceiling:
            if size > size_limit:
                end = DataEnd.TOO_MUCH
            elif (more := grow()) is None:
                end = DataEnd.NO_ROOM
            else:
                ceiling = more
        if end is None and len(line) > line_limit:
            end = DataEnd.TOO_LONG
        if end is not None:
            out.close()
            await skip_rest(reader, b"\r\n")
            return DataRead(end, b"", size)
        watch.see(line)
        if line[:1] == b".":
            out.write(memoryview(line)[1:])  # RFC 5321 4.5.2: the transparency dot goes
        else:
            out.write(line)
    data = out.getvalue()  # the buffer itself, no copy
    out.close()
    return DataRead(DataEnd.OK, data, size)


async def skip_rest(reader: asyncio.StreamReader, before: bytes) -> None:
    """Consume the rest of a DATA phase without keeping it: everything up to the first
    ``.<CRLF>`` that starts a line. ``before``: the last two bytes already read (CRLF at
    the start of a line).

    The reader never hands out more than it was asked for, so pipelined commands after
    the end stay in it: ``readuntil`` gives up to a separator, and on LimitOverrunError
    the bytes it reports as consumed hold no separator start."""
    while True:
        try:
            chunk = await reader.readuntil(END_OF_DATA)
        except asyncio.LimitOverrunError as exc:
            block = await reader.read(exc.consumed)
            before = (before + block[-2:])[-2:]
            continue
        if (before + chunk[:-3])[-2:] == b"\r\n":
            return
        before = b"\r\n"  # the chunk ended with .<CRLF> inside a line: a line ended

"""SMTP smuggling: the raw DATA lines watched before dot-unstuffing changes them.

A lone dot delimited by anything but CRLF on both sides is a smuggling shape (<LF>.<LF>,
<LF>.<CR><LF>, <CR><LF>.<LF>, <CR>.<CR>, <CR><LF>.<CR>, <CR>.<CR><LF>, <LF>.<CR> ...).
The DATA reader (``data.py``, like aiosmtpd >= 1.4.6) only ends DATA on
<CR><LF>.<CR><LF>, but a laxer downstream could split the message there, so the server
refuses such input outright. Other bare line endings are only noted, so the message can be
normalised to CRLF.
"""

from __future__ import annotations

import re

# Checked on the raw lines as read (before dot-unstuffing hides a leading dot); each line
# read during DATA ends in CRLF, so a line that starts with "." + CR/LF is <CRLF>.<CR|LF>.
_SMUGGLE = re.compile(rb"(?:^|\r|\n)\.(?:\r|\n)")
_END_OF_DATA = b".\r\n"


def bare_line_end(raw_line: bytes) -> bool:
    """Whether a CRLF-terminated line holds a CR or LF before its final CRLF (rare)."""
    end = len(raw_line) - 2
    return raw_line.find(b"\n", 0, end) >= 0 or raw_line.find(b"\r", 0, end) >= 0


def smuggling_suspect(raw_line: bytes) -> bool:
    """Whether one raw DATA line (as read, CRLF-terminated) carries a smuggling shape."""
    return raw_line != _END_OF_DATA and _SMUGGLE.search(raw_line) is not None


class DataLines:
    """What the raw lines of the current DATA phase held; one per connection."""

    def __init__(self) -> None:
        self.bare_line_ends = False  # a line held a bare CR or LF: normalise to CRLF
        self.smuggling = False  # a line held a smuggling shape: refuse

    def reset(self) -> None:
        """A new DATA phase: forget the last one's findings."""
        self.bare_line_ends = False
        self.smuggling = False

    def see(self, raw_line: bytes) -> None:
        """One line as read (CRLF-terminated, before dot-unstuffing), by ``data.read_data``."""
        # Every shape needs a bare CR or LF, so the regex runs only on such lines.
        if bare_line_end(raw_line):
            self.bare_line_ends = True
            self.smuggling = self.smuggling or smuggling_suspect(raw_line)

"""SMTP replies as frozen values, and the fixed set of replies the relay gives."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    status: str  # RFC 3463 enhanced status code, e.g. "2.0.0"
    text: str

    @property
    def line(self) -> str:
        text = " ".join(self.text.split())  # one line, no CR/LF from anyone's text
        return f"{self.code} {self.status} {text}".rstrip()

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def code_class(self) -> str:
        return f"{self.code // 100}xx"


RELAY_DENIED = Reply(550, "5.7.1", "Relaying denied")
BAD_ADDRESS = Reply(553, "5.1.3", "Bad recipient address syntax")
TOO_MANY_RCPTS = Reply(452, "4.5.3", "Too many recipients")
LEADING_CONTINUATION = Reply(
    550, "5.6.0", "Message must not start with a continuation line (RFC 5322 2.2.3)"
)
NUL_IN_DATA = Reply(550, "5.6.0", "NUL characters are not allowed in message data (RFC 6152)")
SMUGGLING = Reply(550, "5.5.2", "Bare CR or LF around a lone dot is not allowed (RFC 5321 2.3.8)")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
IDLE_TIMEOUT = Reply(421, "4.4.2", "Idle timeout, closing connection")
DATA_TIMEOUT = Reply(421, "4.4.2", "DATA phase timed out, closing connection")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
INTERNAL_ERROR = Reply(451, "4.3.0", "Temporary local problem, try again later")
# A large message finds no room in the DATA memory budget (smtp/budget.py): 452 at MAIL for
# its SIZE= (RFC 1870 6.1), 451 after the end of data when it outgrew what it reserved.
NO_ROOM_AT_MAIL = Reply(452, "4.3.1", "Insufficient system storage, try again later")
NO_ROOM_FOR_DATA = Reply(451, "4.3.1", "Insufficient system resources, try again later")


# RFC 2034: once ENHANCEDSTATUSCODES is advertised, every reply but the greeting, the EHLO
# lines and 354 carries one. aiosmtpd's own replies ("503 Error: need RCPT command",
# "221 Bye") do not, so they get the class default Postfix uses for the same reply.
_DEFAULT_STATUS = {
    221: "2.0.0",
    250: "2.0.0",
    251: "2.1.5",
    252: "2.0.0",
    421: "4.3.0",
    450: "4.2.0",
    451: "4.3.0",
    452: "4.3.1",
    454: "4.7.0",
    500: "5.5.2",
    501: "5.5.4",
    502: "5.5.1",
    503: "5.5.1",
    504: "5.5.4",
    530: "5.7.0",
    550: "5.0.0",
    552: "5.3.4",
    553: "5.1.3",
    554: "5.0.0",
    555: "5.5.4",
}
_HAS_STATUS = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")


def with_enhanced_status(line: str) -> str:
    """``503 Error: ...`` -> ``503 5.5.1 Error: ...``; lines that have one, or take none
    (220, 354, anything not a reply line), are returned unchanged."""
    if len(line) < 4 or not line[:3].isdigit() or line[3] not in " -" or _HAS_STATUS.match(line):
        return line
    code = int(line[:3])
    if code in (220, 354) or line[0] not in "245":
        return line  # the greeting and the DATA go-ahead take none (RFC 2034 3)
    status = _DEFAULT_STATUS.get(code, f"{line[0]}.0.0")
    return f"{line[:4]}{status} {line[4:]}".rstrip()

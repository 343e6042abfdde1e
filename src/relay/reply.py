"""SMTP replies as frozen values, and the fixed set of replies the relay gives."""

from __future__ import annotations

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
SMUGGLING = Reply(550, "5.5.2", "Bare CR or LF around a lone dot is not allowed (RFC 5321 2.3.8)")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
IDLE_TIMEOUT = Reply(421, "4.4.2", "Idle timeout, closing connection")
DATA_TIMEOUT = Reply(421, "4.4.2", "DATA phase timed out, closing connection")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
INTERNAL_ERROR = Reply(451, "4.3.0", "Temporary local problem, try again later")

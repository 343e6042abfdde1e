"""Logging set up as `relay serve` runs it (the supervisor and every worker)."""

from __future__ import annotations

import logging
import sys


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(process)d %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    # aiosmtpd ("mail.log") logs every command with addresses at INFO, DATA lines (bodies)
    # at DEBUG, and at WARNING the client's own words unescaped: "unrecognised: <command>"
    # (ESC or a bare CR included), which is also where the body lines of a refused
    # pipelined DATA land. Only its ERRORs (a bug in aiosmtpd, peer address only) pass; our
    # one line per message and the session-limit lines (client text escaped by
    # smtp/logsafe.printable) replace the rest. A filter that escaped its messages would
    # still log body words, so the level it is.
    logging.getLogger("mail.log").setLevel(logging.ERROR)

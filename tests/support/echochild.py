"""A pipeproc child for tests: answers ``pid:<payload reversed>``; ``fail`` raises in
the handler, ``exit`` ends the process without answering, ``hang`` never answers."""

from __future__ import annotations

import os
import sys
import time

from relay.proc.pipes import serve


def handle(payload: bytes) -> bytes:
    if payload == b"fail":
        raise ValueError("asked to fail")
    if payload == b"exit":
        os._exit(3)
    if payload == b"hang":
        time.sleep(3600)
    return str(os.getpid()).encode() + b":" + payload[::-1]


if __name__ == "__main__":
    sys.exit(serve(handle))

"""The classifier child process (``[model] workers`` of them per relay worker).

Started by ``serving.Classifier`` as ``python -m relay.classifier.child PARENT_PID
MODEL_PATH`` through ``relay.proc.pipes.PipeWorkers``: it loads the audited model once
and answers requests in order. Only this process imports the model's libraries (numpy,
scikit-learn); the SMTP worker sends bytes and reads bytes. Parsed, never unpickled:

- ``C`` + raw message -> 8-byte big-endian float (spam probability) + 1 byte (parse
  degraded); the classify requests that arrive together go through one ``classify_many``;
- ``F`` + a body's text (UTF-8, surrogates passed through) -> its MinHash band keys
  (``minhash.fingerprint``) joined by newlines: the ``bulk_count`` fact's work, here so a
  relay worker never loads numpy; needs no model;
- ``B`` + raw message -> JSON ``{"sha256": root model digest, "p": root model probability}``;
- ``I`` -> JSON ``{"path", "version", "trained_at", "thresholds", "max_raw_bytes"}``, or
  ``{"error": reason}`` when the model could not be loaded (the child stays up to say so:
  the parent reports the reason and closes it).
"""

from __future__ import annotations

import gc
import json
import signal
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from relay.classifier.minhash import fingerprint
from relay.errors import ModelError
from relay.proc.lifetime import die_with_parent, release_free_memory
from relay.proc.pipes import serve

if TYPE_CHECKING:
    from relay.classifier.model import LoadedModel

CLASSIFY, BASE_SCORE, INFO, FINGERPRINT = b"C", b"B", b"I", b"F"
TEXT_ERRORS = "surrogatepass"  # the child sees the very text the worker holds
ANSWER = struct.Struct(">d?")  # probability, degraded


def encode_answer(probability: float, degraded: bool) -> bytes:
    return ANSWER.pack(probability, degraded)


def decode_answer(payload: bytes) -> tuple[float, bool]:
    probability, degraded = ANSWER.unpack(payload)
    return float(probability), bool(degraded)


@dataclass(frozen=True, slots=True)
class Served:
    """The model this child holds, or why it holds none."""

    model: LoadedModel | None
    error: str = ""

    def loaded(self) -> LoadedModel:
        if self.model is None:
            raise ModelError(self.error)
        return self.model

    def handle(self, payload: bytes) -> bytes:
        op, body = payload[:1], payload[1:]
        if op == CLASSIFY:
            return encode_answer(*self.loaded().classify_bytes(body))
        if op == BASE_SCORE:
            root = self.loaded().root
            answer = {"sha256": str(root.card["model_sha256"]), "p": root.classify_bytes(body)[0]}
            return json.dumps(answer).encode()
        if op == INFO:
            return json.dumps(self.describe()).encode()
        if op == FINGERPRINT:
            return "\n".join(fingerprint(body.decode("utf-8", TEXT_ERRORS))).encode()
        raise ValueError("unknown request")

    def handle_many(self, payloads: list[bytes]) -> list[bytes]:
        """Classify requests in one prediction call (most of one message's cost is the
        prediction's per-call overhead); any other request on its own."""
        raws = [p[1:] for p in payloads if p[:1] == CLASSIFY]
        results = iter(self.loaded().classify_many(raws) if raws else [])
        return [
            encode_answer(*next(results)) if p[:1] == CLASSIFY else self.handle(p) for p in payloads
        ]

    def describe(self) -> dict[str, object]:
        if self.model is None:
            return {"error": self.error}
        from relay.classifier.features import FeatureSettings

        info = self.model.info
        settings = FeatureSettings.from_dict(self.model.card.get("features", {}))
        return {
            "path": info.path,
            "version": info.version,
            "trained_at": info.trained_at,
            "thresholds": info.thresholds,
            "max_raw_bytes": settings.max_raw_kb * 1024,
        }


def load(path: Path) -> Served:
    from relay.classifier.model import load_model

    try:
        model = load_model(path)
    except ModelError as exc:
        return Served(None, str(exc))
    if "sklearn" in sys.modules:  # a scikit-learn pipeline (not a numpy-only scorer)
        import sklearn

        # Inputs are our own hashed counts: per-call finiteness checks are pure overhead.
        sklearn.set_config(assume_finite=True, skip_parameter_validation=True)
    model.classify_bytes(b"Subject: warm-up\r\n\r\nwarm-up\r\n")  # first call builds caches
    gc.collect()
    release_free_memory()  # the decompression buffers of loading (~40 MB)
    return Served(model)


def start(argv: list[str], program: str) -> Served | None:
    """A child's start from its command line ``PROGRAM PARENT_PID MODEL_PATH``: dies with
    its parent from now on, then loads the model (None: bad usage, said on stderr)."""
    if len(argv) != 3 or not argv[1].isdigit():
        print(f"usage: python -m {program} PARENT_PID MODEL_PATH", file=sys.stderr)
        return None
    # now, not only in serve: a relay killed during the seconds of loading leaves no orphan
    die_with_parent(int(argv[1]), signal.SIGKILL)
    served = load(Path(argv[2]))
    if served.model is None:  # said to the parent on its first question; logged here too
        print(f"{program}: cannot load the model: {served.error}", file=sys.stderr)
    return served


def main(argv: list[str]) -> int:
    served = start(argv, "relay.classifier.child")
    return 2 if served is None else serve(served.handle, served.handle_many)


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""Serving the spam model: ``Classifier`` sends raw message bytes to child processes
(``relay.classifier.child``, each holding the audited model once) over the pipe transport
of ``relay.proc.pipes``, so no CPU work runs on the event loop, no helper thread takes the
GIL from it, and the relay process never imports the model's libraries (this module
imports neither ``model`` nor ``features``).

Batching needs nothing here: the requests of one loop turn leave in one write
(``PipeWorkers``), and a child classifies the requests it reads together in one
prediction call. A child that dies is replaced and the messages it held are sent once
more; one that gives no answer within ``kill_after`` seconds is killed, and that message fails (the
default policy requires ``spam_probability``: 451, retried later). At most
``max_pending`` messages wait for the children; more fail at once (docs/operations.md
"Overload").

The children may also verify signatures for the relay worker's ``Authenticator``
(``module="relay.analysis"``, opened so by ``assembly.open_classifier``): the bound and
the pids here are then this classifier's own, and a verification that overruns its deadline
kills a child under classifications too, which are sent once more like after any death.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay.classifier.child import (
    BASE_SCORE,
    CLASSIFY,
    FINGERPRINT,
    INFO,
    TEXT_ERRORS,
    decode_answer,
)
from relay.errors import ModelError, WorkerBusy, WorkerFailure, WorkerTimeout
from relay.message import Message
from relay.proc.pipes import PipeWorkers

CHILD_MODULE = "relay.classifier.child"
TIMEOUT = 10.0  # seconds a message may wait for its answer ([model] timeout)
MAX_PENDING = 256  # messages waiting for the children, per relay worker ([model] max_pending)


@dataclass(frozen=True, slots=True)
class Classification:
    probability: float
    degraded: bool


@dataclass(frozen=True, slots=True)
class ServedModel:
    """What an operator needs to know about the model in use (metrics, logs): the
    child's ``LoadedModel.info``, read from its answer."""

    path: str
    version: str  # the card's version, else the first 12 hex digits of the file's sha256
    trained_at: str
    thresholds: dict[str, float]


class Classifier:
    """Spam probability service: ``workers`` child processes, each holding the model once.

    Create with ``await Classifier.open(path, workers=n)``; it raises ModelError when the
    model is missing, corrupt or untrusted, so the relay never serves without it.
    Loop-affine, like ``PipeWorkers``.
    """

    def __init__(
        self,
        children: PipeWorkers,
        info: ServedModel,
        max_raw_bytes: int,
        kill_after: float,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self._children = children
        self._info = info
        self._max_raw = max_raw_bytes
        self._timeout = kill_after
        # Counted here, not by the pool: a pool that also verifies holds requests of both
        # kinds, and each kind keeps its own bound ([model] and [auth] max_pending).
        self._max_pending = max_pending
        self._held = 0

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        workers: int = 1,
        kill_after: float = TIMEOUT,
        max_pending: int = MAX_PENDING,
        module: str = CHILD_MODULE,
        nice: int = 0,
    ) -> Classifier:
        """``module``: the child to run, ``python -m module PARENT_PID MODEL_PATH``; one
        that answers the classifier's requests (``relay.analysis`` answers verification
        requests too). ``nice``: how far below the caller's the children's CPU priority is."""
        children = PipeWorkers(
            module,
            workers,
            name="relay-classifier" if module == CHILD_MODULE else "relay-analysis",
            args=(str(path),),
            nice=nice,
        )
        try:
            await children.start()
            # One question per child (sent together, each goes to an idle child), so a
            # child that could not load the model says why now.
            replies = await asyncio.gather(*(children.call(INFO) for _ in range(workers)))
            answers = [json.loads(reply) for reply in replies]
        except BaseException:
            await children.close()
            raise
        errors = [str(a["error"]) for a in answers if "error" in a]
        if errors:
            await children.close()
            raise ModelError(errors[0])
        first: dict[str, Any] = answers[0]
        info = ServedModel(
            path=str(first["path"]),
            version=str(first["version"]),
            trained_at=str(first["trained_at"]),
            thresholds={str(k): float(v) for k, v in first["thresholds"].items()},
        )
        return cls(children, info, int(first["max_raw_bytes"]), kill_after, max_pending)

    @property
    def info(self) -> ServedModel:
        return self._info

    @property
    def children(self) -> PipeWorkers:
        """The pool of child processes (shared with verification when opened on
        ``relay.analysis``); closed by ``close``."""
        return self._children

    @property
    def pids(self) -> list[int]:
        """The child processes now."""
        return sorted(self._children.pids)

    @property
    def replaced(self) -> int:
        """Children that died or were killed (each replaced) since ``open``."""
        return self._children.replaced

    @property
    def pending(self) -> int:
        """Classifier requests sent to the children (or waiting for one to start) and not
        answered yet; verification requests in shared children are not counted."""
        return self._held

    @property
    def closed(self) -> bool:
        """``close`` has run (its children are gone once it returned)."""
        return self._children.closed and not self._children.pids

    async def classify(self, message: Message) -> Classification:
        """Raises WorkerTimeout when no answer came within ``kill_after`` (the child was
        killed), else ModelError when the model could not answer: ``max_pending`` messages
        wait already (WorkerBusy), its child died twice (WorkerDied), the model failed on
        this message (WorkerError). Either way a policy that requires the classifier
        defers the message."""
        answer = await self._ask(CLASSIFY, message.raw[: self._max_raw])
        return Classification(*decode_answer(answer))

    async def base_score(self, raw: bytes) -> tuple[str, float]:
        """(base model sha256, its spam probability) of raw bytes: what a feedback entry
        keeps so a model update can fit its combiner without the message body."""
        answer = json.loads(await self._ask(BASE_SCORE, raw[: self._max_raw]))
        return str(answer["sha256"]), float(answer["p"])

    async def fingerprint(self, text: str) -> tuple[str, ...]:
        """A body's MinHash band keys (classifier/minhash.py), computed by a child so this
        process never loads numpy. Fails as ``classify`` does, and counts against the same
        ``max_pending``."""
        answer = await self._ask(FINGERPRINT, text.encode("utf-8", TEXT_ERRORS))
        return tuple(answer.decode().split("\n"))

    async def _ask(self, op: bytes, raw: bytes) -> bytes:
        try:
            if self._held >= self._max_pending:
                raise WorkerBusy(f"classifier: {self._held} messages pending already")
            self._held += 1
            try:
                return await self._children.call(op, raw, kill_after=self._timeout, retry=True)
            finally:
                self._held -= 1
        except WorkerTimeout:
            raise  # a failure of its own kind (timeout) to the facts' fault counting
        except WorkerFailure as exc:
            # Counted as the model's failure (kind "model" in relay_fact_errors_total)
            # rather than the generic "worker" of the children underneath.
            raise ModelError(f"classifier: {type(exc).__name__}: {exc}") from exc

    async def predict(self, message: Message) -> float:
        return (await self.classify(message)).probability

    async def close(self) -> None:
        await self._children.close()

"""Serving the spam model: ``Classifier`` runs feature extraction and prediction in a
process pool (spawned workers, each loading the audited model once in its initializer)
and sends raw bytes, so no CPU work runs on the event loop and the relay process itself
never imports scikit-learn.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import gc
import logging
import multiprocessing
import os
from concurrent.futures import BrokenExecutor, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay.classifier.features import FeatureSettings
from relay.classifier.model import LoadedModel, ModelInfo, load_model, read_card
from relay.errors import ModelError
from relay.message import Message
from relay.proc.lifetime import die_with_parent

log = logging.getLogger("relay.classifier")

MAX_BATCH = 32  # messages per pool call

# Per worker *process* state, written only by the pool initializer in that process; the
# relay process never reads or writes it.
_WORKER: dict[str, Any] = {}


def _new_pool(path: Path, workers: int) -> ProcessPoolExecutor:
    # spawn, not fork: forking a process that runs an event loop and threads is unsafe.
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_worker_init,
        initargs=(str(path), os.getpid()),
    )


def _worker_init(model_path: str, parent_pid: int) -> None:
    die_with_parent(parent_pid)
    import sklearn

    # Inputs are our own hashed counts: per-call finiteness checks are pure overhead here.
    sklearn.set_config(assume_finite=True, skip_parameter_validation=True)
    try:
        _WORKER["model"] = load_model(Path(model_path))
    except ModelError as exc:
        _WORKER["error"] = str(exc)
    _release_load_buffers()


def _release_load_buffers() -> None:
    """Hand the decompression buffers of loading back to the OS (~40 MB per worker)."""
    gc.collect()
    # Not glibc: nothing to trim, the memory is only reused.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _worker_probe() -> ModelInfo:
    if "error" in _WORKER:
        raise ModelError(_WORKER["error"])
    model: LoadedModel = _WORKER["model"]
    model.classify_bytes(b"Subject: warm-up\r\n\r\nwarm-up\r\n")  # first call builds caches
    return model.info


def _worker_classify(raws: list[bytes]) -> list[tuple[float, bool]]:
    if "error" in _WORKER:
        raise ModelError(_WORKER["error"])
    model: LoadedModel = _WORKER["model"]
    return model.classify_many(raws)


def _worker_base_score(raw: bytes) -> tuple[str, float]:
    if "error" in _WORKER:
        raise ModelError(_WORKER["error"])
    root = _WORKER["model"].root
    return str(root.card["model_sha256"]), root.classify_bytes(raw)[0]


@dataclass(frozen=True, slots=True)
class Classification:
    probability: float
    degraded: bool


class Classifier:
    """Spam probability service: a process pool of workers, each holding the model once.

    Create with ``await Classifier.open(path, workers=n)``; it raises ModelError when the
    model is missing, corrupt or untrusted, so the relay never serves without it.
    """

    def __init__(
        self,
        pool: ProcessPoolExecutor,
        info: ModelInfo,
        max_raw_bytes: int,
        workers: int,
        path: Path | None = None,
    ) -> None:
        self._pool = pool
        self._path = path  # to start a new pool when a worker dies (None: never)
        self.replaced = 0  # pools replaced after a worker died
        self._info = info
        self._max_raw = max_raw_bytes
        self._workers = workers
        # Micro-batching: at most one batch per worker in flight; what arrives meanwhile
        # waits here and goes as the next batch. No added latency when the pool is idle.
        self._pending: list[tuple[bytes, asyncio.Future[tuple[float, bool]]]] = []
        self._in_flight = 0

    @classmethod
    async def open(cls, path: Path, *, workers: int = 1) -> Classifier:
        card = read_card(path)  # cheap checks first, in this process, for a clear error
        settings = FeatureSettings.from_dict(card.get("features", {}))
        pool = _new_pool(path, workers)
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.gather(
                *(loop.run_in_executor(pool, _worker_probe) for _ in range(workers))
            )
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        return cls(pool, infos[0], settings.max_raw_kb * 1024, workers, path)

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def pids(self) -> list[int]:
        """The pool's worker processes now (none before the first task of a new pool)."""
        processes = getattr(self._pool, "_processes", None) or {}
        return sorted(int(pid) for pid in processes)

    async def classify(self, message: Message) -> Classification:
        future: asyncio.Future[tuple[float, bool]] = asyncio.get_running_loop().create_future()
        self._pending.append((message.raw[: self._max_raw], future))
        self._pump()
        probability, degraded = await future
        return Classification(probability, degraded)

    def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending and self._in_flight < self._workers:
            batch = self._pending[:MAX_BATCH]
            del self._pending[:MAX_BATCH]
            pool = self._pool
            try:  # a pool already known broken refuses the task at once
                done = loop.run_in_executor(pool, _worker_classify, [raw for raw, _ in batch])
            except BrokenExecutor as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                self._replace_pool(pool)
                continue
            self._in_flight += 1
            done.add_done_callback(functools.partial(self._finished, batch, pool))

    def _finished(
        self,
        batch: list[tuple[bytes, asyncio.Future[tuple[float, bool]]]],
        pool: ProcessPoolExecutor,
        done: asyncio.Future[list[tuple[float, bool]]],
    ) -> None:
        self._in_flight -= 1
        for i, (_, future) in enumerate(batch):
            if future.done():  # its caller gave up (cancelled)
                continue
            if done.cancelled():
                future.cancel()
            elif (error := done.exception()) is not None:
                future.set_exception(error)
            else:
                future.set_result(done.result()[i])
        if not done.cancelled() and isinstance(done.exception(), BrokenExecutor):
            self._replace_pool(pool)
        self._pump()

    def _replace_pool(self, broken: ProcessPoolExecutor) -> None:
        """A worker died (killed, out of memory): a ProcessPoolExecutor stays broken for
        good, so start a new one. The batch in flight already failed (the policy defers
        those messages when it requires the classifier); the next batches go to the new
        pool, whose workers load the model on their first task."""
        if self._path is None or broken is not self._pool:
            return  # already replaced by an earlier failed batch of the same pool
        self._pool = _new_pool(self._path, self._workers)
        self.replaced += 1
        log.warning("classifier worker died; started a new pool (%d so far)", self.replaced)
        broken.shutdown(wait=False, cancel_futures=True)

    async def base_score(self, raw: bytes) -> tuple[str, float]:
        """(base model sha256, its spam probability) of raw bytes: what a feedback entry
        keeps so a model update can fit its combiner without the message body."""
        loop = asyncio.get_running_loop()
        pool = self._pool
        try:
            return await loop.run_in_executor(pool, _worker_base_score, raw[: self._max_raw])
        except BrokenExecutor:
            self._replace_pool(pool)
            raise

    async def predict(self, message: Message) -> float:
        return (await self.classify(message)).probability

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._pool.shutdown, True)

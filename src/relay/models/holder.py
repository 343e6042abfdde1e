"""The classifier in force in a running relay: swapped atomically on reload.

Each message pins the classifier current when its processing starts (``pin``) and unpins
it when done, so mail in flight finishes on the model it started with; a replaced
classifier's process pool is closed once the last message pinning it is done. One holder
per relay process (worker), owned by the lifespan; it closes what it holds on exit.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the relay process imports serving only when a model is enabled
    from relay.classifier.serving import Classifier

log = logging.getLogger("relay.model")
Opener = Callable[[Path], Awaitable["Classifier"]]


class ClassifierHolder:
    def __init__(self, classifier: Classifier, path: Path) -> None:
        self.current = classifier
        self.path = path  # the model file ``current`` was opened from
        self.generation = 0
        self._pins: dict[int, int] = {}  # id(classifier) -> messages using it
        self._retired: dict[int, Classifier] = {}  # replaced, waiting for their last pin
        self._closing: set[asyncio.Task[None]] = set()

    def pin(self) -> Classifier:
        c = self.current
        self._pins[id(c)] = self._pins.get(id(c), 0) + 1
        return c

    def unpin(self, classifier: Classifier) -> None:
        key = id(classifier)
        left = self._pins.get(key, 1) - 1
        if left > 0:
            self._pins[key] = left
            return
        self._pins.pop(key, None)
        retired = self._retired.pop(key, None)
        if retired is not None:
            self._close_later(retired)

    def swap(self, classifier: Classifier, path: Path) -> None:
        """Make ``classifier`` current; the old one closes when no message pins it."""
        old = self.current
        self.current, self.path = classifier, path
        self.generation += 1
        if self._pins.get(id(old), 0) > 0:
            self._retired[id(old)] = old
        else:
            self._close_later(old)

    async def reload(self, path: Path, opener: Opener) -> bool:
        """Open ``path`` and swap it in if it is not the file in force; False when it is.
        Raises (ModelError ...) with the old classifier still current."""
        if path == self.path:
            return False
        self.swap(await opener(path), path)
        return True

    def _close_later(self, classifier: Classifier) -> None:
        task = asyncio.get_running_loop().create_task(classifier.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        await self.current.close()
        for retired in list(self._retired.values()):
            await retired.close()
        self._retired.clear()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


__all__ = ["ClassifierHolder"]

"""`relay learn --spam|--ham|--forget PATH... | -` and `relay learn --stats`.

Exit 0 when every message was recorded, 1 when any was refused (each refusal on stderr
with its path and reason), 2 for usage or configuration errors (cli/main.py). The key
file is read, never created: a learn run as another user than the relay must not leave
a key the relay cannot read."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO

from relay.config import Settings
from relay.errors import FeedbackRefused
from relay.feedback.intake import read_paths, read_stdin
from relay.feedback.learn import Action, BaseScorer, Learner
from relay.feedback.store import FeedbackStore, open_feedback
from relay.secretkey import load_key


async def _open(settings: Settings) -> FeedbackStore:
    key = load_key(settings.security.key_file)
    return await open_feedback(settings.state, settings.feedback, key)


def _scorer(settings: Settings) -> BaseScorer | None:
    """The base model's score of each report, kept for model updates; loaded once, on
    the first report (about 1 s), in a thread so the store's loop never waits on it."""
    if not settings.model.enabled:
        return None
    loaded: list[Any] = []

    def score(raw: bytes) -> tuple[str, float]:
        from relay.classifier.model import load_model

        if not loaded:
            loaded.append(load_model(settings.model.path).root)
        return str(loaded[0].card["model_sha256"]), loaded[0].classify_bytes(raw)[0]

    async def scorer(raw: bytes) -> tuple[str, float]:
        return await asyncio.to_thread(score, raw)

    return scorer


async def learn_paths(
    settings: Settings,
    action: Action,
    paths: list[Path],
    *,
    reporter: str,
    source: str,
    stdin: BinaryIO | None = None,
) -> int:
    store = await _open(settings)
    refused = 0
    limit = settings.feedback.max_message_size
    try:
        learner = Learner(store, scorer=_scorer(settings), authserv_id=settings.authserv_id)
        items = [read_stdin(stdin, limit)] if stdin is not None else read_paths(paths, limit)
        for name, data in items:
            try:
                if isinstance(data, FeedbackRefused):
                    raise data
                outcome = await learner.learn(
                    data, action=action, reporter=reporter, source=source, now=time.time()
                )
            except FeedbackRefused as exc:
                refused += 1
                print(f"relay learn: {name}: refused: {exc}", file=sys.stderr)
                continue
            what = (
                ("forgotten" if outcome.existed else "not known")
                if action == "forget"
                else f"{action}" + (f" (was {outcome.previous})" if outcome.previous else "")
            )
            print(f"{name}: {what} {outcome.digest[:16]}")
    finally:
        await store.close()
    return 1 if refused else 0


async def stats(settings: Settings, *, as_json: bool) -> int:
    store = await _open(settings)
    try:
        counts = await store.stats()
    finally:
        await store.close()
    if as_json:
        print(json.dumps(counts.as_dict()))
    else:
        print(f"spam {counts.spam}  ham {counts.ham}  entries {counts.entries}")
    return 0


def run(
    settings: Settings,
    action: Action | None,
    paths: list[str],
    *,
    reporter: str,
    source: str,
    as_json: bool,
) -> int:
    if action is None:
        return asyncio.run(stats(settings, as_json=as_json))
    stdin = sys.stdin.buffer if paths == ["-"] else None
    return asyncio.run(
        learn_paths(
            settings,
            action,
            [Path(p) for p in paths],
            reporter=reporter,
            source=source,
            stdin=stdin,
        )
    )

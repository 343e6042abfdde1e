"""The model registry: one folder per version, a ``CURRENT`` pointer, a history.

```
var/models/                       ([model] registry)
  CURRENT                         the promoted version's name (absent: [model] path)
  history.jsonl                   one JSON line per promote / rollback / refusal
  v0003-1a2b3c4d5e6f/
    spam.skops  spam.card.json    the site model and the version's card
    base.skops  base.card.json    a copy of the base model it stands on (pinned by sha256)
    status.json                   candidate | promoted | refused, and why
```

A version folder is written under a temporary name and renamed into place; ``CURRENT`` is
written to a temporary file, fsynced and ``os.replace``d, so a crash leaves the old pointer
or the new one, never half of one. Promoting loads the version through the audited loader
first (sha256 against the card, type allowlist, library versions), so a corrupt, tampered
or untrusted file is never promoted, ``--force`` or not; the relay loads it through the
same loader again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from relay.classifier.cardfile import card_path
from relay.config import Settings
from relay.durable import fsync_dir, replace_file
from relay.errors import ModelError

if TYPE_CHECKING:
    from relay.models.update import Candidate

# The model's modules (classifier.model, training, models.update: numpy, ~12 MiB of RSS)
# are imported in the functions that use them: a relay worker imports this module for
# current_model_path and registry_stats, which read small files only (issue 17).

MODEL_NAME = "spam.skops"
BASE_NAME = "base.skops"
CURRENT = "CURRENT"
HISTORY = "history.jsonl"
LOCK = ".update.lock"  # held by `relay model update` while it trains and saves
STATUS = "status.json"
Status = Literal["candidate", "promoted", "refused"]


@dataclass(frozen=True, slots=True)
class Version:
    name: str
    path: Path  # the version's model file (what the relay loads)
    status: str
    reason: str
    created: str
    current: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "status": self.status,
            "reason": self.reason,
            "created": self.created,
            "current": self.current,
        }


class Registry:
    """The versions under one folder; every write is atomic (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def current(self) -> str | None:
        try:
            name = (self.root / CURRENT).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        return name or None

    def model_path(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise ModelError(f"{self.root}: not a version name: {name!r}")
        path = self.root / name / MODEL_NAME
        if not path.parent.is_dir():
            raise ModelError(f"{self.root}: no version {name}")
        return path

    def status(self, name: str) -> dict[str, Any]:
        try:
            data = json.loads((self.root / name / STATUS).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {"status": "unknown", "reason": "status.json missing or unreadable"}
        return data if isinstance(data, dict) else {"status": "unknown", "reason": ""}

    def versions(self) -> list[Version]:
        if not self.root.is_dir():
            return []
        current = self.current()
        out = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if folder.name.startswith("."):
                continue  # a version still being written
            st = self.status(folder.name)
            out.append(
                Version(
                    name=folder.name,
                    path=folder / MODEL_NAME,
                    status=str(st.get("status", "unknown")),
                    reason=str(st.get("reason", "")),
                    created=str(st.get("created", "")),
                    current=folder.name == current,
                )
            )
        return out

    def save(self, candidate: Candidate, *, now: float) -> Version:
        """Write a candidate as a new version (status candidate, or refused with the gate's
        reasons); returns it. The base file is copied, so a version stands alone."""
        import skops.io as sio

        from relay.classifier.training import library_versions, sha256_file

        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".new-{os.getpid()}-{int(now * 1000)}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            base = candidate.base
            shutil.copyfile(base.path, tmp / BASE_NAME)
            shutil.copyfile(card_path(base.path), card_path(tmp / BASE_NAME))
            model = tmp / MODEL_NAME
            sio.dump(candidate.site, model, compression=zipfile.ZIP_DEFLATED, compresslevel=6)
            sha = sha256_file(model)
            number = 1 + max((_number(v.name) for v in self.versions()), default=0)
            name = f"v{number:04d}-{sha[:12]}"
            card = {
                **candidate.card,
                "version": name,
                "model_file": MODEL_NAME,
                "model_sha256": sha,
                "model_bytes": model.stat().st_size,
                "libraries": library_versions(),
                "trusted_types": sorted(sio.get_untrusted_types(file=model)),
                "composite": {
                    "base_file": BASE_NAME,
                    "base_sha256": str(base.card["model_sha256"]),
                    "combiner": list(candidate.combiner),
                },
            }
            card_path(model).write_text(json.dumps(card, indent=1, sort_keys=True) + "\n")
            status: Status = "candidate" if candidate.gate.passed else "refused"
            reason = "; ".join(candidate.gate.reasons)
            created = datetime.fromtimestamp(now, UTC).isoformat()
            self._write_status(tmp, status, reason, created)
            for path in tmp.iterdir():
                with path.open("rb") as fh:
                    os.fsync(fh.fileno())
            tmp.replace(self.root / name)
            fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if status == "refused":
            self._log("refused", name, reason, now)
        return Version(name, self.root / name / MODEL_NAME, status, reason, created, False)

    def _write_status(self, folder: Path, status: str, reason: str, created: str) -> None:
        body = {"status": status, "reason": reason, "created": created}
        replace_file(folder / STATUS, json.dumps(body, sort_keys=True) + "\n")

    def _log(self, action: str, name: str | None, detail: str, now: float) -> None:
        line = {
            "at": datetime.fromtimestamp(now, UTC).isoformat(),
            "action": action,
            "version": name,
            "detail": detail,
        }
        with (self.root / HISTORY).open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(line, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def history(self) -> list[dict[str, Any]]:
        try:
            text = (self.root / HISTORY).read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    @contextlib.contextmanager
    def update_lock(self) -> Iterator[bool]:
        """Holds the registry's update lock for the block; yields False (without waiting)
        when another `relay model update` holds it, so a scheduled run that overlaps a slow
        one skips instead of training the same feedback twice. flock: the kernel releases it
        when the holder dies, so a crash never leaves the registry locked."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / LOCK).open("a") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def last_snapshot(self) -> float | None:
        """When the newest version's feedback was read (its card's ``feedback.read_at``,
        the time `relay model update` read the store), or None before the first update.
        Whatever was reported after it is new to every version."""
        times = []
        for v in self.versions():
            try:
                card = json.loads(card_path(v.path).read_text(encoding="utf-8"))
                times.append(float(card["feedback"]["read_at"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # a broken version is reported by list/promote, not here
        return max(times, default=None)

    def verify(self, name: str) -> None:
        """Load the version through the audited loader; ModelError when it must not serve."""
        from relay.classifier.model import load_model

        load_model(self.model_path(name))

    def promote(self, name: str, *, now: float, force: bool = False) -> None:
        """Point CURRENT at ``name`` after loading it whole. A refused version needs
        ``force``; a file that fails the audited loader is refused whatever ``force`` says."""
        path = self.model_path(name)
        try:
            self.verify(name)
        except ModelError as exc:
            self._mark(name, "refused", f"failed verification: {exc}")
            self._log("promote-refused", name, str(exc), now)
            raise
        st = self.status(name)
        if st.get("status") == "refused" and not force:
            self._log("promote-refused", name, str(st.get("reason", "")), now)
            raise ModelError(
                f"{name} was refused by its gate ({st.get('reason', '')}); "
                "`relay model promote --force` overrides the gate"
            )
        previous = self.current()
        replace_file(self.root / CURRENT, name + "\n")
        self._mark(
            name, "promoted", "forced past its gate" if st.get("status") == "refused" else ""
        )
        self._log("promote", name, f"previous {previous or '[model] path'}; {path}", now)

    def _mark(self, name: str, status: str, reason: str) -> None:
        created = str(self.status(name).get("created", ""))
        self._write_status(self.root / name, status, reason, created)

    def rollback(self, *, now: float) -> str | None:
        """Point CURRENT back at the version promoted before the current one (or at
        ``[model] path`` when there was none); returns the version now in force."""
        chain: list[str | None] = [None]
        for line in self.history():
            if line.get("action") == "promote":
                chain.append(str(line["version"]))
            elif line.get("action") == "rollback":
                target = line.get("version")
                # A rollback pops the chain back to the version it restored.
                while len(chain) > 1 and chain[-1] != target:
                    chain.pop()
        current = self.current()
        while len(chain) > 1 and chain[-1] == current:
            chain.pop()
        target = chain[-1]
        if target is None:
            with contextlib.suppress(FileNotFoundError):
                (self.root / CURRENT).unlink()
            fsync_dir(self.root)
        else:
            self.verify(target)
            replace_file(self.root / CURRENT, target + "\n")
        self._log("rollback", target, f"from {current}", now)
        return target


def _number(name: str) -> int:
    head = name[1:].partition("-")[0]
    return int(head) if name.startswith("v") and head.isdigit() else 0


def current_model_path(settings: Settings) -> Path:
    """The model file the relay loads: the promoted version, else ``[model] path``."""
    registry = Registry(settings.model.registry)
    name = registry.current()
    if name is None:
        return settings.model.path
    return registry.model_path(name)


def registry_stats(root: Path) -> dict[str, Any]:
    """Metrics of the registry: versions by status, refused promotions, and the feedback
    counts of the version in force (its card). Reads a folder listing and small files."""
    registry = Registry(root)
    versions: dict[str, int] = {"candidate": 0, "promoted": 0, "refused": 0}
    for v in registry.versions():
        versions[v.status] = versions.get(v.status, 0) + 1
    refused = sum(
        1 for line in registry.history() if line.get("action") in ("refused", "promote-refused")
    )
    feedback: dict[str, int] = {}
    name = registry.current()
    if name is not None:
        try:
            card = json.loads(card_path(registry.model_path(name)).read_text(encoding="utf-8"))
            usable = card.get("feedback", {}).get("usable", {})
            feedback = {k: int(usable.get(k, 0)) for k in ("spam", "ham")}
        except (OSError, ValueError, ModelError):
            feedback = {}
    return {"versions": versions, "refused": refused, "feedback": feedback}


def card_summary(path: Path) -> dict[str, Any]:
    """The card fields `relay model list` shows (digest-checked)."""
    from relay.classifier.model import read_card

    card = read_card(path)
    held = card.get("evaluation", {}).get("held_out_feedback", {}).get("candidate") or {}
    return {
        "feedback": card.get("feedback", {}).get("usable", {}),
        "held_out_auc": held.get("roc_auc"),
        "held_out_fpr": (held.get("at_thresholds", {}).get("gate") or {}).get("fpr"),
        "parent": card.get("parent", {}),
    }


__all__ = ["Registry", "Version", "card_summary", "current_model_path", "registry_stats"]

"""`relay model update|list|promote|rollback|reload|compile`: model versions (docs/classifier.md).

Exit codes: 0 done; 1 a candidate was refused by its gate (update) or a promotion was
refused (promote); 2 usage, configuration or model errors (cli/main.py)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relay.config import Settings, load_settings
from relay.errors import ModelError

if TYPE_CHECKING:  # the command bodies import the model layers only when they run
    from relay.models.registry import Registry


def _gate_settings(settings: Settings) -> Any:
    from relay.models.update import GateSettings

    m = settings.model
    return GateSettings(
        max_fpr=m.promote_max_fpr,
        tolerance=m.promote_tolerance,
        threshold=m.promote_threshold,
        reporter_share=settings.feedback.reporter_share,
    )


async def _feedback(settings: Settings, base_sha: str) -> tuple[list[Any], dict[str, float]]:
    from relay.feedback.store import open_feedback
    from relay.secretkey import load_key

    store = await open_feedback(
        settings.state, settings.feedback, load_key(settings.security.key_file)
    )
    try:
        return await store.entries(), await store.scores(base_sha)
    finally:
        await store.close()


def _base_test(corpus: Path | None, labels: Path | None) -> list[tuple[bytes, bool]] | None:
    if labels is None:
        return None
    from relay.classifier.training import read_labels

    items = read_labels(corpus or labels.parent, labels, "test")
    if not items:
        raise ModelError(f"{labels}: no test rows for the base test gate")
    return [(item.data or b"", item.label == "spam") for item in items]


def run_update(args: argparse.Namespace) -> int:
    from relay.models.registry import Registry

    settings = load_settings(args.config)
    registry = Registry(settings.model.registry)
    with registry.update_lock() as held:
        if not held:
            print("another `relay model update` is running on this registry; skipped")
            return 0
        return _update(args, settings, registry)


def _update(args: argparse.Namespace, settings: Settings, registry: Registry) -> int:
    from relay.classifier.model import load_model
    from relay.models.registry import current_model_path
    from relay.models.update import update_model

    started = time.perf_counter()
    # The feedback snapshot's time: the card records it, and --min-new counts what was
    # reported after the newest version's snapshot.
    snapshot = time.time()
    base = load_model(settings.model.path).root
    entries, scores = asyncio.run(_feedback(settings, str(base.card["model_sha256"])))
    if args.min_new:
        since = registry.last_snapshot()
        new = sum(1 for e in entries if since is None or e.at > since)
        if new < args.min_new:
            print(
                f"{new} new reports since the last update (--min-new {args.min_new}); nothing to do"
            )
            return 0
    current = load_model(current_model_path(settings))
    # Entries kept with their body (keep_bodies) can be scored now when no score was kept.
    for entry in entries:
        if entry.digest not in scores and entry.body is not None:
            scores[entry.digest] = base.classify_bytes(entry.body)[0]
    parent = {"version": current.info.version, "sha256": str(current.card["model_sha256"])}
    candidate = update_model(
        base,
        entries,
        settings.model.held_out_share,
        base_scores=scores,
        now=snapshot,
        current=current,
        gate=_gate_settings(settings),
        base_test=_base_test(args.base_test_corpus, args.base_test_labels),
        parent=parent,
        n_jobs=args.jobs,
    )
    version = registry.save(candidate, now=time.time())
    feedback = candidate.card["feedback"]
    print(
        f"{version.name}: {version.status}; trained on {feedback['training']['entries']} "
        f"entries, held out {feedback['held_out']['entries']}, "
        f"{time.perf_counter() - started:.1f}s"
    )
    for reason in candidate.gate.reasons:
        print(f"  refused: {reason}", file=sys.stderr)
    if not candidate.gate.passed:
        return 1
    if args.promote:
        registry.promote(version.name, now=time.time())
        if args.reload:
            pid = _signal_relay(args.pidfile)
            print(f"promoted {version.name}; sent SIGHUP to the relay (pid {pid})")
        else:
            print(f"promoted {version.name}; `relay model reload` switches the running relay")
    return 0


def _signal_relay(pidfile: Path | None) -> int:
    from relay.launch import PID_FILE
    from relay.policy import signal_reload

    return signal_reload(pidfile or PID_FILE)


def run_list(args: argparse.Namespace) -> int:
    from relay.models.registry import Registry, card_summary

    settings = load_settings(args.config)
    registry = Registry(settings.model.registry)
    rows = []
    for v in registry.versions():
        row = v.as_dict()
        try:
            row.update(card_summary(v.path))
        except ModelError as exc:
            row["problem"] = str(exc)
        rows.append(row)
    if args.json:
        print(json.dumps({"current": registry.current(), "versions": rows}, indent=1))
        return 0
    if registry.current() is None:
        print(f"in force: {settings.model.path} ([model] path; no version promoted)")
    for row in rows:
        mark = "*" if row["current"] else " "
        auc = row.get("held_out_auc")
        auc_text = "-" if auc is None else f"{auc:.4f}"
        detail = row.get("problem") or row["reason"]
        print(f"{mark} {row['name']}  {row['status']:9}  held-out AUC {auc_text}  {detail}")
    return 0


def run_promote(args: argparse.Namespace) -> int:
    from relay.models.registry import Registry

    settings = load_settings(args.config)
    try:
        Registry(settings.model.registry).promote(args.version, now=time.time(), force=args.force)
    except ModelError as exc:
        print(f"relay model promote: refused: {exc}", file=sys.stderr)
        return 1
    print(f"promoted {args.version}; `relay model reload` switches the running relay")
    return 0


def run_rollback(args: argparse.Namespace) -> int:
    from relay.models.registry import Registry

    settings = load_settings(args.config)
    target = Registry(settings.model.registry).rollback(now=time.time())
    print(f"in force: {target or f'{settings.model.path} ([model] path)'}")
    return 0


def run_reload(args: argparse.Namespace) -> int:
    from relay.classifier.model import load_model
    from relay.models.registry import current_model_path

    settings = load_settings(args.config)
    load_model(current_model_path(settings))  # a broken pointer fails here, not in the relay
    pid = _signal_relay(args.pidfile)
    print(f"sent SIGHUP to relay (pid {pid})")
    return 0


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"not a count of reports: {text!r}")
    return n


def run_compile(args: argparse.Namespace) -> int:
    """Write the numpy-only compiled scorer of a plain model and name it in its card."""
    from relay.classifier.training import compile_model

    path = args.path or load_settings(args.config).model.path
    entry = compile_model(path)
    print(f"{path}: compiled scorer {entry['file']} sha256 {entry['sha256'][:12]}... in the card")
    return 0


def add_model(sub: argparse._SubParsersAction[argparse.ArgumentParser], config: Path) -> None:
    p = sub.add_parser("model", help="model versions: update from feedback, promote, roll back")
    cmds = p.add_subparsers(dest="model_command", required=True)
    update = cmds.add_parser("update", help="train a candidate from the base model + feedback")
    update.add_argument("--base-test-corpus", type=Path, help="corpus root of the base test split")
    update.add_argument("--base-test-labels", type=Path, help="labels TSV (its test rows)")
    update.add_argument("--promote", action="store_true", help="promote when every gate passes")
    update.add_argument("--jobs", type=int, default=1, help="cross-validation processes")
    update.add_argument(
        "--min-new",
        type=_count,
        default=0,
        metavar="N",
        help="train only when N reports arrived since the newest version (for a timer)",
    )
    update.add_argument(
        "--reload", action="store_true", help="after a promotion, SIGHUP the running relay"
    )
    update.add_argument("--pidfile", type=Path, default=None, help="default: var/relay.pid")
    ls = cmds.add_parser("list", help="versions, their status and held-out figures")
    ls.add_argument("--json", action="store_true")
    promote = cmds.add_parser("promote", help="make VERSION the one the relay loads")
    promote.add_argument("version")
    promote.add_argument(
        "--force",
        action="store_true",
        help="past a refusing gate (never past a corrupt or untrusted file)",
    )
    rollback = cmds.add_parser("rollback", help="back to the version promoted before")
    reload = cmds.add_parser("reload", help="SIGHUP the relay: its workers load CURRENT")
    reload.add_argument("--pidfile", type=Path, default=None, help="default: var/relay.pid")
    compile_ = cmds.add_parser("compile", help="write a model's numpy-only compiled scorer")
    compile_.add_argument("path", nargs="?", type=Path, help="model file (default: [model] path)")
    handlers = {
        update: run_update,
        ls: run_list,
        promote: run_promote,
        rollback: run_rollback,
        reload: run_reload,
        compile_: run_compile,
    }
    for parser, handler in handlers.items():
        parser.add_argument("--config", type=Path, default=config, help="relay.toml")
        parser.set_defaults(handler=handler)

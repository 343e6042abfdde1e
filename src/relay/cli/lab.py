"""`relay lab`, `relay lab diff` and `relay lab tune` from parsed arguments (cli/main.py)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from relay.config import Settings, load_settings
from relay.errors import RelayError
from relay.lab import diff
from relay.lab.corpus import Source, sources_from_box, sources_from_labels
from relay.lab.engine import EngineSpec
from relay.lab.env import LabEnv
from relay.lab.run import LabOptions, run_lab


def _sources(args: argparse.Namespace) -> tuple[list[Source], str]:
    sources: list[Source] = []
    described: list[str] = []
    if args.labels is not None:
        if args.corpus is None:
            raise RelayError("--labels needs --corpus (the directory its paths are under)")
        sources += sources_from_labels(args.corpus, args.labels, args.subset)
        described.append(f"{args.labels.name}" + (f" (set {args.subset})" if args.subset else ""))
    for path in args.ham:
        sources += sources_from_box(path, "ham")
        described.append(f"ham {path.name}")
    for path in args.spam:
        sources += sources_from_box(path, "spam")
        described.append(f"spam {path.name}")
    if not sources:
        raise RelayError("no messages: give --corpus with --labels, or --ham / --spam")
    return sources, ", ".join(described)


def run(args: argparse.Namespace) -> int:
    if args.out is None:
        raise RelayError("lab: --out is required (the report directory)")
    if args.shadow_log is not None:
        from relay.ops.shadowlog import report_shadow_log

        summary = report_shadow_log(args.shadow_log, args.out)
        print(f"shadow log report: {args.out / 'shadow.md'} ({summary['lines']} lines)")
        return 0
    if not args.policy:
        raise RelayError("give at least one --policy file")
    if args.pages < 0:
        raise RelayError("--pages: 0 (a fact page for every listed message) or more")
    settings = load_settings(args.config) if args.config is not None else Settings()
    sources, description = _sources(args)
    trusted = tuple(dict.fromkeys([settings.authserv_id, *args.trust_authserv_id]))
    options = LabOptions(
        sources=tuple(sources),
        description=description,
        policies=tuple(args.policy),
        out=args.out,
        env=LabEnv(settings=settings, trusted_authserv_ids=trusted, inputs=args.inputs),
        cache_dir=None if args.no_cache else args.cache,
        jobs=args.jobs if args.jobs > 0 else os.cpu_count() or 1,
        progress=not args.no_progress and sys.stderr.isatty(),
        pages=args.pages if args.pages > 0 else None,
        rehash=args.rehash,
        engine=EngineSpec(
            args.engine, args.scheduler, args.workers, pass2=args.pass2, shards=args.shards
        ),
    )
    report = run_lab(options)
    for e in report["regime_errors"]:
        for problem in e["problems"]:
            print(f"relay lab: {problem}", file=sys.stderr)
    c = report["corpus"]
    print(
        f"{c['readable']} messages ({c['spam']} spam, {c['ham']} ham, "
        f"{len(c['unreadable'])} unreadable), {len(report['regimes'])} regimes, "
        f"{report['timings']['total']:.1f}s: {args.out / 'report.html'}"
    )
    return 1 if report["regime_errors"] else 0


def run_diff(args: argparse.Namespace) -> int:
    """Compare, then print the chosen rendering or write all three; exit 1 when some
    messages could not be compared (on one side only, different content or label)."""
    before = diff.load_source(args.a)
    after = None if args.b is None else diff.load_source(args.b)
    labels = None if args.labels is None else diff.read_labels(args.labels)
    if args.limit < 0:
        raise RelayError("--limit: 0 (all) or more")
    filters = diff.Filters(label=args.label, rule=args.rule, limit=args.limit or None)
    regimes = None if args.regimes is None else (args.regimes[0], args.regimes[1])
    result = diff.compare(before, after, regimes, labels, filters)
    if args.out is None:
        sys.stdout.write(_rendering(result, args.format))
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        for fmt in ("json", "md", "html"):
            (args.out / f"diff.{fmt}").write_text(_rendering(result, fmt))
        print(
            f"{result.changed} verdicts changed of {result.compared} messages compared: "
            f"{args.out / 'diff.md'}"
        )
    if result.mismatched:
        print(
            f"relay lab diff: {len(result.one_side)} messages on one side only, "
            f"{len(result.content_differs)} with different content, "
            f"{len(result.label_differs)} with different labels: not compared",
            file=sys.stderr,
        )
        return 1
    return 0


def _rendering(result: diff.Diff, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(diff.to_dict(result), indent=1) + "\n"
    return diff.markdown(result) if fmt == "md" else diff.html(result)


def run_tune(args: argparse.Namespace) -> int:
    """Tune one policy on the train rows; exit 1 when the proposed file fails the check."""
    from relay.lab import tune

    # `relay lab --set test tune ...` puts the set on the parent parser: refused as well.
    tune.refuse_set(getattr(args, "subset", None))
    tune.refuse_set(args.tune_set)
    if args.folds < 2:
        raise RelayError("--folds: at least 2")
    settings = load_settings(args.config) if args.config is not None else Settings()
    trusted = tuple(dict.fromkeys([settings.authserv_id, *args.trust_authserv_id]))
    policy: Path = args.tune_policy
    options = tune.TuneOptions(
        policy=policy,
        corpus=args.corpus,
        labels=args.labels,
        out=args.out or Path("var/lab") / f"tune-{policy.stem}",
        env=LabEnv(settings=settings, trusted_authserv_ids=trusted, inputs=args.inputs),
        budget=tune.parse_budget(args.fp_budget),
        folds=args.folds,
        seed=args.seed,
        cache_dir=None if args.no_cache else args.cache,
        jobs=args.jobs if args.jobs > 0 else os.cpu_count() or 1,
        progress=not args.no_progress and sys.stderr.isatty(),
        heldout=args.heldout,
        presets=args.preset_probabilities,
    )
    data = tune.run_tune(options)
    before, after = data["original"]["figures"], data["tuned"]["out_of_fold"]
    print(
        f"{data['policy']['name']}: {data['corpus']['used']} train messages, method "
        f"{data['chosen']}; spam stopped {_share(before['spam_stopped'])} -> "
        f"{_share(after['spam_stopped'])}, legitimate mail blocked "
        f"{_share(before['ham_blocked'])} -> {_share(after['ham_blocked'])} (out of fold): "
        f"{data['policy']['proposed']}"
    )
    for problem in data["policy"]["check_problems"]:
        print(f"relay lab tune: {problem}", file=sys.stderr)
    return 0 if data["policy"]["check_ok"] else 1


def _share(share: dict[str, Any]) -> str:
    return "n/a" if share["rate"] is None else f"{100 * share['rate']:.1f}%"

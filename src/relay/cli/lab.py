"""`relay lab` from parsed arguments (defined in cli.py): build LabOptions, run, report."""

from __future__ import annotations

import argparse
import os
import sys

from relay.config import Settings, load_settings
from relay.errors import RelayError
from relay.lab.corpus import Source, sources_from_box, sources_from_labels
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
    if args.shadow_log is not None:
        from relay.ops.shadowlog import report_shadow_log

        summary = report_shadow_log(args.shadow_log, args.out)
        print(f"shadow log report: {args.out / 'shadow.md'} ({summary['lines']} lines)")
        return 0
    if not args.policy:
        raise RelayError("give at least one --policy file")
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

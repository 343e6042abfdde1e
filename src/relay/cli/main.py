"""Command line: argument parsing only; every command calls into the module that does it.

Each command registers itself in one ``_add_<command>`` function and imports its module
lazily, so `relay --help` stays fast and one broken extra never stops `relay serve`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from relay.config import DEFAULT_CONFIG
from relay.errors import RelayError

Handler = Callable[[argparse.Namespace], int]


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the SMTP relay")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="relay.toml")

    def run(args: argparse.Namespace) -> int:
        from relay.launch import serve

        return int(serve(args.config))

    p.set_defaults(handler=run)
    m = sub.add_parser(
        "milter",
        help="run only the milter front door ([milter] listen) for Postfix or Sendmail",
    )
    m.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="relay.toml")

    def run_milter(args: argparse.Namespace) -> int:
        from relay.launch import serve

        return int(serve(args.config, smtp=False))

    m.set_defaults(handler=run_milter)


def _iso_time(text: str) -> float:
    """An ISO 8601 time as Unix seconds; one without an offset is UTC."""
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()


def _add_scan(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("scan", help="print the facts and the verdict for one message as JSON")
    p.add_argument("file", type=Path, help="message file (.eml; an mbox From_ line is fine)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="relay.toml")
    p.add_argument("--policy", type=Path, help="policy file (default: the configured one)")
    p.add_argument("--mail-from", help="envelope sender (default: Return-Path header)")
    p.add_argument("--rcpt", action="append", default=[], help="envelope recipient (repeat)")
    p.add_argument("--client-ip", default="127.0.0.1", help="SMTP client address")
    p.add_argument("--helo", help="HELO name")
    p.add_argument("--facts", default="", help="comma-separated fact names (default: all)")
    p.add_argument(
        "--time",
        type=_iso_time,
        help="the message's time, ISO 8601 (UTC unless an offset is given); "
        "default: its newest Received date, else its Date",
    )

    def run(args: argparse.Namespace) -> int:
        import asyncio
        import dataclasses
        import json

        from relay.cli.scan import ScanRequest, scan
        from relay.config import load_settings

        settings = load_settings(args.config)
        if args.policy is not None:
            policy = dataclasses.replace(settings.policy, path=args.policy)
            settings = dataclasses.replace(settings, policy=policy)
        req = ScanRequest(
            path=args.file,
            mail_from=args.mail_from,
            rcpt_to=tuple(args.rcpt),
            client_ip=args.client_ip,
            helo=args.helo,
            facts=tuple(n.strip() for n in args.facts.split(",") if n.strip()),
            time=args.time,
        )
        print(json.dumps(asyncio.run(scan(settings, req)), indent=2, sort_keys=False))
        return 0

    p.set_defaults(handler=run)


def _add_policy(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("policy", help="check policy files; reload the running relay's policy")
    cmds = p.add_subparsers(dest="policy_command", required=True)
    check = cmds.add_parser("check", help="validate policy files; print every problem")
    check.add_argument("files", nargs="+", type=Path, metavar="FILE")
    reload = cmds.add_parser("reload", help="check the configured policy, then SIGHUP the relay")
    reload.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="relay.toml")
    reload.add_argument("--pidfile", type=Path, default=None, help="default: var/relay.pid")

    def run_check(args: argparse.Namespace) -> int:
        from relay.facts import default_registry
        from relay.policy import check_files, load_policy

        registry = default_registry()
        problems = check_files(args.files, registry)
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print(f"{len(problems)} problem(s) in {len(args.files)} file(s)", file=sys.stderr)
            return 1
        for path in args.files:
            print(f"ok: {load_policy(path, registry).summary()}")
        return 0

    def run_reload(args: argparse.Namespace) -> int:
        from relay.config import load_settings
        from relay.facts import default_registry
        from relay.launch import PID_FILE
        from relay.policy import check_files, signal_reload

        settings = load_settings(args.config)
        paths = [p for p in (settings.policy.path, *settings.policy.shadow) if p is not None]
        problems = check_files(paths, default_registry())
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print("not reloading: the running relay would keep its old policy", file=sys.stderr)
            return 1
        pid = signal_reload(args.pidfile or PID_FILE)
        print(f"sent SIGHUP to relay (pid {pid})")
        return 0

    check.set_defaults(handler=run_check)
    reload.set_defaults(handler=run_reload)


def _add_quarantine(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("quarantine", help="list, show, release, delete or reseal quarantined mail")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="relay.toml")
    cmds = p.add_subparsers(dest="quarantine_command", required=True)
    ls = cmds.add_parser("list", help="one line per quarantined message")
    ls.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    show = cmds.add_parser("show", help="metadata and verdict of one message")
    show.add_argument("id")
    show.add_argument("--raw", action="store_true", help="print the raw message instead")
    release = cmds.add_parser("release", help="deliver through the configured transport")
    release.add_argument("id")
    delete = cmds.add_parser("delete", help="remove a message for good")
    delete.add_argument("id")
    reseal = cmds.add_parser(
        "reseal",
        help="vouch for an entry whose seal fails (from an older version or an old key): "
        "read its meta.json first",
    )
    reseal.add_argument("id")

    def run(args: argparse.Namespace) -> int:
        from relay.cli.quarantine import run_command
        from relay.config import load_settings

        settings = load_settings(args.config)
        return run_command(
            settings,
            args.quarantine_command,
            getattr(args, "id", ""),
            as_json=getattr(args, "json", False),
            raw=getattr(args, "raw", False),
        )

    p.set_defaults(handler=run)


def _add_learn(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "learn",
        help="record spam/ham feedback (or forget it) for messages; --stats prints counts",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--spam", dest="action", action="store_const", const="spam")
    what.add_argument("--ham", dest="action", action="store_const", const="ham")
    what.add_argument("--forget", dest="action", action="store_const", const="forget")
    what.add_argument("--stats", dest="action", action="store_const", const="stats")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="relay.toml")
    p.add_argument("--reporter", help="who reports (default: the invoking user name)")
    p.add_argument("--source", default="cli", help='how it came (default "cli")')
    p.add_argument("--json", action="store_true", help="with --stats: one JSON object")
    p.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="message files, Maildirs or mbox files; - for one message on stdin",
    )

    def run(args: argparse.Namespace) -> int:
        import getpass

        from relay.cli.learn import run as run_learn
        from relay.config import load_settings

        stats = args.action == "stats"
        if stats and args.paths:
            p.error("--stats takes no PATH")
        if not stats and not args.paths:
            p.error("give PATH... or - for one message on stdin")
        if "-" in args.paths and len(args.paths) > 1:
            p.error("- (stdin) reads exactly one message and goes alone")
        settings = load_settings(args.config)
        return run_learn(
            settings,
            None if stats else args.action,
            args.paths,
            reporter=args.reporter or getpass.getuser(),
            source=args.source,
            as_json=args.json,
        )

    p.set_defaults(handler=run)


def _add_lab(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("lab", help="replay a labelled corpus through regimes; report the costs")
    p.add_argument("--corpus", type=Path, help="directory the labels file's paths are under")
    p.add_argument("--labels", type=Path, help="TSV: relative_path, ham|spam, optional set")
    p.add_argument("--set", dest="subset", help="only rows of this set (e.g. test)")
    p.add_argument(
        "--ham",
        type=Path,
        action="append",
        default=[],
        help="Maildir, mbox or directory of legitimate mail (repeatable)",
    )
    p.add_argument(
        "--spam",
        type=Path,
        action="append",
        default=[],
        help="Maildir, mbox or directory of spam (repeatable)",
    )
    p.add_argument("--policy", type=Path, nargs="+", default=[], help="regime files (TOML)")
    # Not required by argparse: `relay lab diff` shares this parser (cli/lab.py checks it).
    p.add_argument("--out", type=Path, help="report directory (required)")
    p.add_argument(
        "--cache",
        type=Path,
        default=Path("var/lab-cache"),
        help="fact cache directory (default var/lab-cache)",
    )
    p.add_argument("--no-cache", action="store_true", help="compute everything, keep nothing")
    p.add_argument(
        "--rehash",
        action="store_true",
        help="read and hash every tar member again, even if the archive's size, mtime and "
        "inode are those the cache recorded",
    )
    p.add_argument(
        "--pages",
        type=int,
        default=1000,
        metavar="K",
        help="fact pages for the first K rows of each message list (default 1000, 0: all)",
    )
    p.add_argument("--jobs", type=int, default=0, help="worker processes (default: all cores)")
    p.add_argument(
        "--engine",
        choices=("local", "dask"),
        default="local",
        help="where stateless facts run: local process pool, or Dask (docs/lab.md)",
    )
    p.add_argument(
        "--scheduler", metavar="tcp://HOST:PORT", help="--engine dask: a running scheduler"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="--engine dask without --scheduler: loopback workers to start (default: --jobs)",
    )
    p.add_argument(
        "--pass2",
        choices=("auto", "sequential", "sharded"),
        default="auto",
        help="stateful facts: one ordered loop, or a key-sharded replay (auto: sharded "
        "with --engine dask, sequential locally; docs/lab.md)",
    )
    p.add_argument(
        "--shards",
        type=int,
        default=0,
        help="--pass2 sharded: shards (default: --jobs, or 2 per Dask worker thread)",
    )
    p.add_argument(
        "--config",
        type=Path,
        help="relay.toml: [dns] nameservers (else DNS stays offline), [model], [auth]",
    )
    p.add_argument(
        "--trust-authserv-id",
        action="append",
        default=[],
        metavar="ID",
        help="believe Authentication-Results from this authserv-id (repeatable)",
    )
    p.add_argument(
        "--inputs",
        type=Path,
        help="lab-only oracle lists: consent.tsv, customers.tsv, optouts.tsv ... (docs/lab.md)",
    )
    p.add_argument(
        "--shadow-log", type=Path, help="report on a shadow-mode JSON-lines log instead of a corpus"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    def run(args: argparse.Namespace) -> int:
        from relay.cli.lab import run as run_lab

        return run_lab(args)

    p.set_defaults(handler=run)
    lab_commands = p.add_subparsers(dest="lab_command", metavar="{diff,tune}")
    _add_lab_diff(lab_commands)
    _add_lab_tune(lab_commands)


def _add_lab_diff(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "diff",
        help="compare two lab reports, two regimes of one, or enforced vs shadow in a shadow log",
    )
    p.add_argument("a", type=Path, help="report directory (before), or a shadow log")
    p.add_argument("b", type=Path, nargs="?", help="second report directory (after)")
    p.add_argument(
        "--regimes",
        nargs=2,
        metavar=("X", "Y"),
        help="regime before and after (in one report, in A and B, or in the shadow log)",
    )
    p.add_argument("--out", type=Path, help="write diff.json, diff.md and diff.html here")
    p.add_argument(
        "--format", choices=("md", "json", "html"), default="md", help="printed without --out"
    )
    p.add_argument("--label", choices=("spam", "ham"), help="list only changes of this label")
    p.add_argument("--rule", help="list only changes this rule is responsible for or decided")
    p.add_argument("--limit", type=int, default=50, help="changes listed (default 50; 0: all)")
    p.add_argument("--labels", type=Path, help="shadow log only: TSV of queue_id and spam|ham")

    def run(args: argparse.Namespace) -> int:
        from relay.cli.lab import run_diff

        return run_diff(args)

    p.set_defaults(handler=run)


def _add_lab_tune(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "tune",
        help="fit a policy's scores and thresholds to the train split under a false-positive "
        "budget (cross-validated); write the proposed policy and a report",
    )
    p.add_argument("tune_policy", type=Path, metavar="POLICY", help="policy file to tune")
    p.add_argument("--corpus", type=Path, required=True, help="directory of the labels' paths")
    p.add_argument("--labels", type=Path, required=True, help="TSV: path, ham|spam, [set]")
    # Accepted only to refuse anything but train with a clear message (cli/lab.py).
    p.add_argument("--set", dest="tune_set", help="only 'train' (the default) is accepted")
    p.add_argument("--fp-budget", default="0.1%", help="legitimate mail blocked, at most")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    p.add_argument("--seed", type=int, default=0, help="folds and perceptron (default 0)")
    p.add_argument("--out", type=Path, help="output directory (default var/lab/tune-NAME)")
    p.add_argument(
        "--heldout",
        action="store_true",
        help="also report the test split before and after (never used to fit)",
    )
    p.add_argument(
        "--preset-probabilities",
        type=Path,
        metavar="TSV",
        help="path<TAB>probability: spam_probability for these train rows instead of the "
        "model's (out-of-fold values: bench/oof_probabilities.py); never the test split",
    )
    p.add_argument("--inputs", type=Path, help="lab-only oracle lists (docs/lab.md)")
    p.add_argument("--config", type=Path, help="relay.toml: [dns], [model], [auth]")
    p.add_argument("--trust-authserv-id", action="append", default=[], metavar="ID")
    p.add_argument("--cache", type=Path, default=Path("var/lab-cache"), help="fact cache")
    p.add_argument("--no-cache", action="store_true", help="compute everything, keep nothing")
    p.add_argument("--jobs", type=int, default=0, help="worker processes (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    def run(args: argparse.Namespace) -> int:
        from relay.cli.lab import run_tune

        return run_tune(args)

    p.set_defaults(handler=run)


def _add_train(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("train", help="train the spam classifier and write model + card")
    p.add_argument(
        "--corpus",
        type=Path,
        action="append",
        default=[],
        help="directory or tar archive the labels file's paths are under (one per --labels)",
    )
    p.add_argument(
        "--labels",
        type=Path,
        action="append",
        default=[],
        help="TSV: relative_path, ham|spam, [train|test]; repeat for several training sets",
    )
    p.add_argument("--ham", type=Path, action="append", default=[], help="Maildir/mbox/dir")
    p.add_argument("--spam", type=Path, action="append", default=[], help="Maildir/mbox/dir")
    p.add_argument("--out", type=Path, default=Path("models"), help="output directory")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: fixed)")
    p.add_argument("--quick", action="store_true", help="skip model selection (one candidate)")
    p.add_argument(
        "--recent",
        type=Path,
        default=None,
        help="the --labels file of today's mail: also try adding an SVM of its words alone",
    )

    def run(args: argparse.Namespace) -> int:
        from relay.classifier.selection import SEED
        from relay.cli.classifier import train_command

        if not args.labels and not (args.ham and args.spam):
            p.error("give --labels, or both --ham and --spam")
        return train_command(
            out_dir=args.out,
            corpus=args.corpus,
            labels=args.labels,
            ham=args.ham,
            spam=args.spam,
            seed=SEED if args.seed is None else args.seed,
            quick=args.quick,
            recent=args.recent,
        )

    p.set_defaults(handler=run)


def _add_evaluate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("evaluate", help="score a labelled corpus with a model")
    p.add_argument("--model", type=Path, default=Path("models/spam.skops"))
    p.add_argument("--corpus", type=Path, help="directory the labels file's paths are under")
    p.add_argument("--labels", type=Path, required=True, help="TSV: relative_path, ham|spam")
    p.add_argument("--set", dest="set_name", help="only rows of this set (e.g. test)")
    p.add_argument("--out", type=Path, help="write the figures as JSON here")

    def run(args: argparse.Namespace) -> int:
        from relay.cli.classifier import evaluate_command

        return evaluate_command(
            model_path=args.model,
            corpus=args.corpus,
            labels=args.labels,
            set_name=args.set_name,
            out=args.out,
        )

    p.set_defaults(handler=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_train(sub)
    _add_evaluate(sub)
    _add_lab(sub)
    _add_scan(sub)
    _add_policy(sub)
    _add_quarantine(sub)
    _add_learn(sub)
    from relay.cli.model import add_model

    add_model(sub, DEFAULT_CONFIG)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except RelayError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

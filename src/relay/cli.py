"""Command line: argument parsing only; every command calls into the module that does it.

Each command registers itself in one ``_add_<command>`` function and imports its module
lazily, so `relay --help` stays fast and one broken extra never stops `relay serve`.
"""

from __future__ import annotations

import argparse
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
        from relay.app import serve

        return int(serve(args.config))

    p.set_defaults(handler=run)


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

    def run(args: argparse.Namespace) -> int:
        import asyncio
        import dataclasses
        import json

        from relay.config import load_settings
        from relay.scan import ScanRequest, scan

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
        )
        print(json.dumps(asyncio.run(scan(settings, req)), indent=2, sort_keys=False))
        return 0

    p.set_defaults(handler=run)



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_scan(sub)
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

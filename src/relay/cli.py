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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
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

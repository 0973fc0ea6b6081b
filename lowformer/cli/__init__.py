"""The `lowformer` command. Each subcommand lives in its own module with `add_parser` and `run`;
this module only parses arguments and dispatches."""

from __future__ import annotations

import argparse
import sys

from . import analyze, bench, evaluate, export, info, train

SUBCOMMANDS = [info, bench, analyze, export, train, evaluate]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # exit code 2 with a clear message, as argparse does, plus a hint
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n(see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lowformer", description="Hardware-efficient vision backbones and proof of their speed.")
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"lowformer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"lowformer {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

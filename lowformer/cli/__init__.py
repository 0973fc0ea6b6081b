"""The `lowformer` command. Each subcommand lives in its own module with `add_parser` and `run`;
this module only parses arguments, dispatches, and turns an expected failure into one line on
stderr and the exit code `lowformer.errors` defines (0 ok, 1 runtime failure, 2 usage error,
130 interrupted). Set LOWFORMER_DEBUG=1 to see the traceback as well."""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import EXIT_INTERRUPTED, LowformerRuntimeError, exit_code, is_out_of_memory, one_line
from . import analyze, bench, detect, evaluate, export, info, retrieval, segment, train, tune

SUBCOMMANDS = [info, bench, analyze, export, tune, train, evaluate, detect, segment, retrieval]


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
    except KeyboardInterrupt:
        print(f"lowformer {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        if not _expected(e) or os.environ.get("LOWFORMER_DEBUG"):
            raise
        print(f"lowformer {args.command}: error: {one_line(e)}", file=sys.stderr)
        return exit_code(e)


def _expected(e: BaseException) -> bool:
    """A failure the user can act on from its message; anything else is a bug and shows its traceback."""
    return isinstance(e, (ValueError, TypeError, OSError, LowformerRuntimeError, MemoryError)) or is_out_of_memory(e)


if __name__ == "__main__":
    sys.exit(main())

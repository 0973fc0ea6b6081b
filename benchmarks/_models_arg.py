"""The models a benchmark runs on: model names, or the named sets of `lowformer analyze models`."""

from __future__ import annotations

import argparse

from lowformer.analyze.models import model_set


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """MODEL ... (our names or timm:NAME) and a repeatable --set."""
    p.add_argument("models", nargs="*", metavar="MODEL", help="our names or timm:NAME (or --set)")
    p.add_argument(
        "--set",
        dest="model_sets",
        action="append",
        default=[],
        help="a named model set of `lowformer analyze models` (repeatable)",
    )


def model_names(p: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The names the arguments give; a usage error (exit 2) for both, neither or an unknown set."""
    if bool(args.models) == bool(args.model_sets):
        p.error("give model names or --set, not both (and not neither)")
    try:
        return list(args.models) or [name for s in args.model_sets for name in model_set(s)]
    except ValueError as e:
        p.error(str(e))

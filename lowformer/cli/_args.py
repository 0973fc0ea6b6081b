"""What the measuring subcommands share: argument types (numbers with bounds, image sizes), each
failing with an `argparse.ArgumentTypeError` that says what was expected; the check that outputs can
be written, made before a long run starts; and the note that a busy machine distorts CPU timings."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from .._io import check_writable, check_writable_folder
from ..measure.env import cpu_load, is_busy


def int_at_least(low: int):
    """An argument type: an integer >= `low`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"  # argparse names the type in some messages
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value:g}")
    return value


def positive_float(text: str) -> float:
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def image_size(text: str) -> tuple[int, int]:
    """S or HxW. Whether a model takes that size is the library's one rule
    (`lowformer.factory.check_image_size`), checked before anything is timed."""
    m = re.fullmatch(r"(\d+)(?:x(\d+))?", text.strip().lower())
    if not m:
        raise argparse.ArgumentTypeError(f"image size is S or HxW (e.g. 224 or 256x192), got {text!r}")
    h = int(m.group(1))
    w = int(m.group(2)) if m.group(2) else h
    return h, w


def check_outputs(files: list[str | Path | None], folders: list[str | Path | None] = ()) -> None:
    """Fail now, not after the run, if an output cannot be written: `lowformer.errors.OutputError`
    names the path and the cause (read-only, a folder where a file should be, disk full, ...)."""
    for folder in folders:
        if folder is not None:
            check_writable_folder(folder)
    for path in files:
        if path is not None:
            check_writable(path)


def warn_if_busy(device: str, consequence: str) -> None:
    """CPU timings on a loaded machine are distorted (threads wait on each other): say so up front,
    with what that means for this command's numbers."""
    load, cpus = cpu_load()
    if is_busy(device, load, cpus):
        print(f"  note: load average {load:.1f} on {cpus} CPUs before the run: {consequence}", flush=True)

"""The errors a user can cause, and the exit code every `lowformer` subcommand gives each.

Exit codes (the same for every subcommand, documented in the README):

- 0: ok.
- 1: runtime failure: a file that exists but cannot be used (a corrupt or foreign checkpoint), an
  output that cannot be written (disk full, read-only, a folder in the way), out of memory, a failed
  verification, a training run stopped by a non-finite loss.
- 2: usage error: bad arguments (an unknown model, a value out of range, options that contradict
  each other, an input path that does not exist or names a folder where a file is expected).
- 130: interrupted (Ctrl-C); 143: terminated (SIGTERM). Training saves a resumable checkpoint first.

Library code raises ordinary exceptions (`ValueError`, `TypeError` and `FileNotFoundError` for
usage errors); the classes below mark the runtime failures that are the user's to fix but are not
a bad argument. `exit_code` maps any exception to its code.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class LowformerRuntimeError(RuntimeError):
    """A failure that is not a bad argument: the CLI prints its message (no traceback) and exits 1."""


class CheckpointError(ValueError):
    """A checkpoint file exists but cannot be used: empty, truncated, not a checkpoint at all, a pickle
    that would run code, or weights that do not fit the model. A runtime failure (exit 1), although a
    ValueError for the library's callers."""


class OutputError(OSError):
    """An output file cannot be written. The message names the path and the cause."""

    def __init__(self, path: object, cause: BaseException | str) -> None:
        reason = cause if isinstance(cause, str) else _reason(cause)
        super().__init__(getattr(cause, "errno", None) or errno.EIO, f"cannot write {path}: {reason}")
        self.path = str(path)
        self.reason = reason

    def __str__(self) -> str:
        return self.strerror or ""


class VerificationError(LowformerRuntimeError):
    """A written or compiled model does not reproduce the reference outputs within the tolerance."""


class OutOfMemory(LowformerRuntimeError):
    """The work does not fit in the device's memory; the message says how much it needed where known."""

    @classmethod
    def needs(cls, what: str, needed_bytes: int, available_bytes: int, where: str, hint: str) -> OutOfMemory:
        """The refusal given before running: "WHAT needs ~N GiB of memory, WHERE has M GiB available; HINT"."""
        needed, available = _gib(needed_bytes), _gib(available_bytes)
        return cls(f"{what} needs ~{needed} GiB of memory, {where} has {available} GiB available; {hint}")


def _gib(n: int) -> str:
    gib = n / 2**30
    return f"{gib:.0f}" if gib >= 10 else f"{gib:.1f}" if gib >= 0.1 else f"{gib:.2f}"


_OOM_WORDS = ("out of memory", "can't allocate memory", "not enough memory", "cannot allocate memory")


def is_out_of_memory(e: BaseException) -> bool:
    """True for the ways PyTorch and Python report exhausted host or device memory."""
    import torch

    if isinstance(e, (OutOfMemory, MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(w in text for w in _OOM_WORDS)


@contextmanager
def out_of_memory_as(what: str, hint: str) -> Iterator[None]:
    """Re-raise any out-of-memory error inside as `OutOfMemory("WHAT ran out of memory (detail); HINT")`,
    the style of `OutOfMemory.needs`, for work whose size the user chose."""
    try:
        yield
    except Exception as e:
        if not is_out_of_memory(e) or isinstance(e, OutOfMemory):
            raise
        raise OutOfMemory(f"{what} ran out of memory ({_reason(e)}); {hint}") from e


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror[:1].lower() + e.strerror[1:]
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def exit_code(e: BaseException) -> int:
    """The CLI's exit code for an exception that ended a command."""
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(e, SystemExit):
        return e.code if isinstance(e.code, int) else EXIT_FAILURE
    if is_out_of_memory(e):
        return EXIT_FAILURE
    if isinstance(e, (CheckpointError, OutputError, LowformerRuntimeError)):
        return EXIT_FAILURE
    if isinstance(e, (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return EXIT_USAGE
    return EXIT_FAILURE


def one_line(e: BaseException) -> str:
    """The message the CLI prints for an expected failure (no traceback)."""
    if is_out_of_memory(e) and not isinstance(e, OutOfMemory):
        return f"out of memory ({_reason(e)}); try a smaller --batch-size or --image-size"
    return str(e) or type(e).__name__

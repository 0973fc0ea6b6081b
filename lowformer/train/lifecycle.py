"""What every training command does around its loop: claim a run folder without destroying an earlier
run, and stop cleanly on Ctrl-C or SIGTERM.

`prepare_run_folder` refuses a folder that already holds a run unless the user asked to continue it
(`--resume`) or to replace it (`--overwrite`, which empties it first), and removes the temporary files
a killed checkpoint write left behind. It never empties a folder holding anything a run does not
write (a mistyped `--output ~` must not cost a home directory). `StopSignals` turns SIGINT/SIGTERM into
a flag the loop reads at its next step boundary, so the loop can save a resumable checkpoint, raise
`RunInterrupted` and exit with 130 / 143; a second signal stops at once.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import shlex
import shutil
import signal
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import FrameType

from .._io import check_writable_folder, remove_stale_temp_files
from ..errors import EXIT_INTERRUPTED, EXIT_TERMINATED, OutputError

__all__ = [
    "RUN_FILES",
    "RunFolderExists",
    "RunInterrupted",
    "StopSignals",
    "ignore_stop_signals",
    "prepare_run_folder",
    "resume_command",
]

_logger = logging.getLogger(__name__)

EXIT_CODES = {signal.SIGINT: EXIT_INTERRUPTED, signal.SIGTERM: EXIT_TERMINATED}

# What training runs write into their folder (fnmatch patterns); `--overwrite` deletes only these.
RUN_FILES = (
    "*.pt",
    "*.pth",
    "*.safetensors",
    "*.yaml",
    "*.csv",
    "*.json",
    "tensorboard",
    "events.out.tfevents.*",
    "wandb",
    ".*.tmp",
)


class RunFolderExists(ValueError):
    """The output folder holds an earlier run, and neither resume nor overwrite was asked for."""


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM after saving a resumable checkpoint.

    A KeyboardInterrupt, so code that catches `Exception` does not swallow it; the command line turns
    it into the resume command and `exit_code` (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, message: str, *, exit_code: int, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.checkpoint = checkpoint


def _is_run_file(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def prepare_run_folder(
    folder: str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    run_files: Sequence[str] = RUN_FILES,
) -> Path:
    """Make `folder` ready for a run and return it.

    - empty or missing: created;
    - holds files and `resume`: kept (the run continues), stale temporary files removed;
    - holds files and `overwrite`: emptied first, if every entry matches `run_files` (what runs
      write); anything else in it is refused, nothing deleted;
    - holds files otherwise: `RunFolderExists`, whose message offers `--resume` and `--overwrite`.

    Raises:
        ValueError: `resume` and `overwrite` together.
        OutputError: the folder cannot be created or written (checked now, before any work).
    """
    folder = Path(folder)
    if resume and overwrite:
        raise ValueError("--resume continues the run in the output folder and --overwrite deletes it; give one")
    if folder.exists() and not folder.is_dir():
        raise OutputError(folder, "it is a file, not a folder")
    existing = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    foreign = [name for name in existing if not _is_run_file(name, run_files)]
    if existing and not resume and foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise RunFolderExists(
            f"the output folder {folder} holds files that no run writes ({shown}); nothing was changed. "
            "Choose another --output (or empty that folder yourself)"
        )
    if existing and overwrite:
        _logger.warning("--overwrite: deleting the earlier run in %s (%d entries)", folder, len(existing))
        for name in existing:
            path = folder / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    elif existing and not resume:
        shown = ", ".join(existing[:5]) + (", ..." if len(existing) > 5 else "")
        raise RunFolderExists(
            f"the output folder {folder} already holds a run ({shown}); nothing was changed. "
            "Add --resume to continue it, --overwrite to delete it and start again, or choose another --output"
        )
    try:
        check_writable_folder(folder)
    except OutputError as e:
        raise OutputError(folder, e.reason) from e  # name the folder the user gave, not the probe file
    for path in remove_stale_temp_files(folder):
        _logger.info("removed %s, left by a checkpoint write that was killed", path.name)
    return folder


def resume_command(subcommand: str, checkpoint: str | os.PathLike, extra: Sequence[str] = ()) -> str:
    """The shell command that continues a run from `checkpoint`: `lowformer SUBCOMMAND --resume FILE`,
    started by torchrun the way this process was when it runs under torchrun."""
    args = shlex.join([*subcommand.split(), "--resume", str(checkpoint), *extra])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return f"lowformer {args}"
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    nodes = max(1, world // max(1, per_node))
    launcher = f"torchrun --nproc-per-node {per_node}"
    if nodes > 1:
        launcher += f" --nnodes {nodes} <your rendezvous options>"
    return f"{launcher} -m lowformer {args}"


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader `worker_init_fn`: loader workers leave SIGINT/SIGTERM to the main process.

    Ctrl-C reaches every process of the terminal's process group; a worker that died of it would
    break the batch the main process still needs to finish its step and save. The main process shuts
    its workers down itself.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class StopSignals:
    """Within `with StopSignals() as stop:`, SIGINT and SIGTERM set `stop.signal` instead of raising;
    the loop checks `stop.requested` at each step boundary. A second signal raises KeyboardInterrupt
    (SIGINT) or exits (SIGTERM) at once, unless it comes within `repeat_window_s` of the first: that
    is the same request delivered twice (Ctrl-C reaches torchrun's whole process group, and torchrun
    forwards it to its workers again). Outside the main thread it does nothing (signals can only be
    handled there). The previous handlers come back on exit.
    """

    def __init__(
        self,
        signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM),
        repeat_window_s: float = 1.0,
    ) -> None:
        self.signals = signals
        self.repeat_window_s = repeat_window_s
        self.signal: signal.Signals | None = None
        self._first_at = 0.0
        self._previous: dict[signal.Signals, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signal, EXIT_INTERRUPTED)

    @property
    def name(self) -> str:
        return "Ctrl-C" if self.signal == signal.SIGINT else (self.signal.name if self.signal else "")

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        if self.signal is not None:
            if time.monotonic() - self._first_at < self.repeat_window_s:
                return  # the same request, delivered again
            # the second one: the user does not want to wait
            if sig == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(EXIT_CODES.get(sig, EXIT_TERMINATED))
        self.signal, self._first_at = sig, time.monotonic()
        _logger.warning("%s: stopping at the end of this step (again to stop at once)", self.name)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

"""What every training command does around its loop: claim a run folder without destroying an earlier
run, and stop cleanly on Ctrl-C or SIGTERM.

`prepare_run_folder` refuses a folder that already holds a run unless the user asked to continue it
(`--resume`) or to replace it (`--overwrite`, which empties it first), and removes the temporary files
a killed checkpoint write left behind. `StopSignals` turns SIGINT/SIGTERM into a flag the loop reads at
its next step boundary, so the loop can save a resumable checkpoint and exit with 130 / 143; a second
signal stops at once.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
from pathlib import Path
from types import FrameType

from .._io import check_writable_folder, remove_stale_temp_files
from ..errors import EXIT_INTERRUPTED, EXIT_TERMINATED, OutputError

_logger = logging.getLogger(__name__)

EXIT_CODES = {signal.SIGINT: EXIT_INTERRUPTED, signal.SIGTERM: EXIT_TERMINATED}


class RunFolderExists(ValueError):
    """The output folder holds an earlier run, and neither resume nor overwrite was asked for."""


def prepare_run_folder(folder: str | os.PathLike, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Make `folder` ready for a run and return it.

    - empty or missing: created;
    - holds files and `resume`: kept (the run continues), stale temporary files removed;
    - holds files and `overwrite`: emptied first;
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
    check_writable_folder(folder)
    for path in remove_stale_temp_files(folder):
        _logger.info("removed %s, left by a checkpoint write that was killed", path.name)
    return folder


class StopSignals:
    """Within `with StopSignals() as stop:`, SIGINT and SIGTERM set `stop.signal` instead of raising;
    the loop checks `stop.requested` at each step boundary. A second signal raises KeyboardInterrupt
    (SIGINT) or exits (SIGTERM) at once. Outside the main thread it does nothing (signals can only be
    handled there). The previous handlers come back on exit.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)) -> None:
        self.signals = signals
        self.signal: signal.Signals | None = None
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
        if self.signal is not None:  # the second one: the user does not want to wait
            if sig == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(EXIT_CODES.get(sig, EXIT_TERMINATED))
        self.signal = sig
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

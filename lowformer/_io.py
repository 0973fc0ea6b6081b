"""The one place files are written: a temporary file in the target's folder, then a rename over the
target, so a crash, a kill or a full disk never leaves a half-written file where a good one was.

Every checkpoint, export, JSON, CSV, PNG and report of the package goes through `atomic_write`.
A write that fails raises `OutputError` naming the path and the cause ("no space left on device",
"read-only file system", "is a directory", ...); `check_writable` asks the same question before a
long run starts. A killed writer can leave its temporary file (`.NAME.XXXXXXXX.tmp`) behind;
`remove_stale_temp_files` clears them when that folder is used again.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from .errors import OutputError

TEMP_SUFFIX = ".tmp"


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def _ensure_folder(path: Path) -> None:
    if path.is_dir():
        raise OutputError(path, "it is a folder; give a file name")
    existing = next((p for p in path.parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise OutputError(path, f"{existing} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(path, e) from e


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call `write(tmp_path)` to fill a temporary file next to `path`, then rename it over `path`.

    Raises:
        OutputError: the folder cannot be created, the disk is full or read-only, `path` is a folder.
    """
    path = Path(path)
    _ensure_folder(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=TEMP_SUFFIX)
    except OSError as e:
        raise OutputError(path, e) from e
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file private (0600); give it the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(path, e) from e
    except RuntimeError as e:
        # torch.save reports a failed write (e.g. a full disk) as a RuntimeError from its zip writer:
        # "... write ..." or, when a write stopped short, "unexpected pos N vs M"
        if "write" in str(e).lower() or "unexpected pos" in str(e):
            raise OutputError(path, _disk_reason(path, e)) from e
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _disk_reason(path: Path, e: BaseException) -> str:
    try:
        if os.statvfs(path.parent).f_bavail == 0:
            return "no space left on device"
    except OSError:
        pass
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, data: object) -> Path:
    """`data` as indented JSON (a trailing newline), written atomically."""
    return write_text(path, json.dumps(data, indent=2) + "\n")


def write_csv(path: str | os.PathLike, rows: Iterable[dict], columns: Sequence[str]) -> Path:
    """One CSV row per dict (keys = `columns`; missing keys are empty), written atomically."""
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, buf.getvalue())


def check_writable(path: str | os.PathLike) -> Path:
    """Fail now, not after an hour of work, if `path` could not be written: creates its folder and a
    temporary file beside it (then removes it). Leaves an existing `path` untouched."""
    path = Path(path)
    _ensure_folder(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=TEMP_SUFFIX)
    except OSError as e:
        raise OutputError(path, e) from e
    os.close(fd)
    os.unlink(tmp)
    return path


def check_writable_folder(folder: str | os.PathLike) -> Path:
    """As `check_writable`, for an output folder (created if missing)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(folder, "it is a file, not a folder")
    check_writable(folder / ".lowformer-write-check")
    return folder


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed `atomic_write` left in `folder`; returns what was removed.

    NOTE: call it only where no other process is writing into `folder` (e.g. when a training run
    starts or resumes); a concurrent writer's temporary file would be removed under it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.iterdir():
        if p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX) and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed

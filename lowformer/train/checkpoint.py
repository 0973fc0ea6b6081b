"""Training checkpoints: written atomically, read with `weights_only=True`, the last N kept.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (nothing that needs
code to unpickle):

    state_dict   the weights to evaluate/deploy (the EMA when the recipe keeps one, else the model);
                 what `lowformer.create_model(name, checkpoint_path=...)` and `lowformer eval` load
    model, ema   the raw training weights and the EMA's
    optimizer, scheduler, scaler, rng        everything `--resume` needs to continue exactly
    epoch, step_in_epoch, global_step, best_top1, history, recipe, classes, model_name, ...

A file is written to a temporary name in the same folder and renamed over the target, so a run
killed at any moment leaves either the previous file or the new one, never half of one.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import atomic_write
from ..weights import CheckpointError

__all__ = ["capture_rng", "find_checkpoints", "is_training_checkpoint", "load", "restore_rng", "save", "prune"]

FORMAT = "lowformer-train"
STEP_FILE = re.compile(r"^checkpoint-(\d{8})\.pt$")


def step_name(global_step: int) -> str:
    return f"checkpoint-{global_step:08d}.pt"


def save(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """torch.save to a temporary file, then rename over `path`."""
    return atomic_write(Path(path), lambda tmp: torch.save(state, tmp))


def link_or_copy(src: Path, dst: Path) -> Path:
    """`dst` becomes the same file as `src` (a hard link, else a copy), atomically."""

    def write(tmp: str) -> None:
        os.unlink(tmp)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)

    return atomic_write(dst, write)


def load(path: str | os.PathLike, task: str | None = None) -> dict[str, Any]:
    """A training checkpoint (of `task`, when given), opened with `weights_only=True`; CheckpointError
    when it is not one (or is one of another task: a detector's checkpoint cannot continue a
    classifier's run)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable training checkpoint: {str(e).splitlines()[0]}") from e
    if not is_training_checkpoint(obj):
        raise CheckpointError(
            f"{path} is not a lowformer training checkpoint (no {FORMAT!r} marker); "
            "to start from its weights use --checkpoint (fine-tuning) instead of --resume"
        )
    found = obj.get("task", "classification")
    if task is not None and found != task:
        command = {"detection": "detect", "segmentation": "segment"}.get(found, "train")
        raise CheckpointError(f"{path} is a {found} checkpoint, not a {task} one; use `lowformer {command}`")
    return obj


def is_training_checkpoint(obj: object) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def find_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The step checkpoints in `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def prune(folder: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest `keep` step checkpoints; returns the deleted paths."""
    files = find_checkpoints(folder)
    doomed = files[: max(0, len(files) - keep)]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


# -- RNG state, as plain tensors and tuples (weights_only can read them) ------------------------


def capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])

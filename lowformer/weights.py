"""Checkpoint files: reading (safely), format detection, strict loading, saving, local weights.

Formats read: the official release files (`torch.save` dicts, `{"state_dict": ...}` or
`{"model": ...}`), timm state dicts (`.pth`/`.bin` or `.safetensors`) and our own safetensors
files, whose metadata names the family, the variant and its spec. Pickles are opened with
`weights_only=True`: a file that would run code is refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ._io import atomic_write
from .models._registry import ModelEntry

_logger = logging.getLogger(__name__)

WEIGHTS_ENV = "LOWFORMER_WEIGHTS"

# What a checkpoint records so that it is used as it was trained: timm's data-config keys of the
# model's `pretrained_cfg` (plus the class names). `create_model` puts them back on the model, so
# `timm.data.resolve_data_config(model=model)` and `lowformer eval` use them.
DATA_CONFIG_KEYS = ("input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std", "label_names")
# A training checkpoint (a torch.save dict) keeps the same metadata as a safetensors file under this key.
META_KEY = "meta"


class CheckpointError(ValueError):
    """A checkpoint could not be read or does not fit the model."""


def weights_dir() -> Path:
    """Where `pretrained=True` looks: $LOWFORMER_WEIGHTS, else the user cache dir."""
    if os.environ.get(WEIGHTS_ENV):
        return Path(os.environ[WEIGHTS_ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "lowformer"


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Returns (state_dict, metadata). Unwraps training checkpoints; never executes code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                return {k: f.get_tensor(k) for k in f.keys()}, meta
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    try:
        # DeiT-style training checkpoints (EdgeViT's) carry their `args` Namespace: plain attributes,
        # allowed; anything else that needs code still fails
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load {path}: it is a pickle that needs code execution to load "
            "(torch.load weights_only=True rejected it). Load it only if you trust it, then "
            "re-save its state_dict with torch.save(model.state_dict(), ...) or lowformer.save_checkpoint."
            f"\nDetail: {str(e).splitlines()[0]}"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {e}") from e
    meta = obj.get(META_KEY) if isinstance(obj, dict) else None
    meta = {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}
    return unwrap_state_dict(obj, path), meta


def unwrap_state_dict(obj: object, origin: object = "checkpoint") -> dict[str, torch.Tensor]:
    """A bare state dict, or the one inside `{"state_dict": ...}` / `{"model": ...}`."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors and len(tensors) == len(obj):
            return tensors
    raise CheckpointError(
        f"{origin} holds no state dict: expected a dict of tensors, or one under 'state_dict' or 'model'"
    )


def _describe(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def load_state_dict_into(
    model: nn.Module, state_dict: dict[str, torch.Tensor], fmt: str, classifier: str | None = None
) -> None:
    """Strict load of a native-layout state dict. A classifier of another size is dropped on purpose
    (with a warning); every other mismatch raises `CheckpointError` naming the format and keys."""
    own = model.state_dict()
    state_dict = dict(state_dict)
    if classifier:
        prefix = classifier + "."
        ckpt_cls = [k for k in state_dict if k.startswith(prefix)]
        if ckpt_cls and any(k not in own or state_dict[k].shape != own[k].shape for k in ckpt_cls):
            _logger.warning(
                "the checkpoint's classifier %r (%d classes) does not fit num_classes=%s: it was dropped, "
                "the model's classifier keeps its fresh initialisation",
                classifier,
                state_dict[ckpt_cls[0]].shape[0],
                getattr(model, "num_classes", "?"),
            )
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
            own = {k: v for k, v in own.items() if not k.startswith(prefix)}
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong_shape = [
        f"{k} (checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)})"
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or wrong_shape:
        parts = [f"checkpoint (detected format: {fmt}) does not fit {type(model).__name__}"]
        if missing:
            parts.append(f"missing keys: {_describe(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_describe(unexpected)}")
        if wrong_shape:
            parts.append(f"shape mismatches: {_describe(wrong_shape)}")
        parts.append("Is it a checkpoint of another variant?")
        raise CheckpointError("\n  ".join(parts))
    model.load_state_dict(state_dict, strict=False)


def num_classes_in(state_dict: dict[str, torch.Tensor], classifier: str) -> int | None:
    """Rows of the classifier in a native state dict, or None when it has none."""
    w = state_dict.get(f"{classifier}.weight")
    return int(w.shape[0]) if w is not None and w.ndim == 2 else None


def convert_checkpoint(
    path: str | os.PathLike, entry: ModelEntry
) -> tuple[dict[str, torch.Tensor], str, dict[str, str]]:
    """Read a file and convert it to `entry`'s native layout: (state dict, format, metadata)."""
    state_dict, meta = read_checkpoint(path)
    if meta.get("format") == "lowformer":
        saved_spec = json.loads(meta.get("spec", "null"))
        if meta.get("family") != entry.family or saved_spec != json.loads(json.dumps(entry.spec.to_dict())):
            raise CheckpointError(
                f"{path} was saved from {meta.get('variant')!r} ({meta.get('family')}), whose "
                f"architecture differs from {entry.name!r}; build it with "
                f"lowformer.create_model({meta.get('variant')!r}, checkpoint_path=...) or lowformer.load_model(path)"
            )
    try:
        native, fmt = entry.convert(state_dict, entry.spec)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    return native, ("lowformer safetensors" if meta.get("format") == "lowformer" else fmt), meta


def checkpoint_metadata(model: nn.Module) -> dict[str, str]:
    """What our checkpoints record besides the weights (all strings, as safetensors metadata is):
    format, family, variant, spec, num_classes and `pretrained_cfg`, the JSON of the model's data
    config (`DATA_CONFIG_KEYS`: input size, crop, interpolation, mean/std, class names)."""
    spec = getattr(model, "spec", None)
    variant = getattr(model, "variant", None)
    family = getattr(model, "family", None)
    if spec is None or variant is None:
        raise ValueError("saving needs a model made by lowformer.create_model (it records the variant)")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    data_cfg = {k: _jsonable(cfg[k]) for k in DATA_CONFIG_KEYS if cfg.get(k) is not None}
    return {
        "format": "lowformer",
        "family": str(family),
        "variant": str(variant),
        "spec": json.dumps(spec.to_dict()),
        "num_classes": str(getattr(model, "num_classes", "")),
        "pretrained_cfg": json.dumps(data_cfg),
    }


def _jsonable(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


def data_config_of(meta: dict[str, str]) -> dict:
    """The data config a checkpoint's metadata records (`{}` for files that record none); tuples
    where timm uses tuples."""
    try:
        cfg = json.loads(meta.get("pretrained_cfg") or "{}")
    except json.JSONDecodeError:
        return {}
    if not isinstance(cfg, dict):
        return {}
    return {k: tuple(v) if isinstance(v, list) and k != "label_names" else v for k, v in cfg.items()}


def save_checkpoint(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write `model`'s weights as safetensors with `checkpoint_metadata(model)`, atomically."""
    meta = checkpoint_metadata(model)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def find_pretrained(entry: ModelEntry) -> Path:
    """The official release file of `entry` in the local weights dir, or an error saying what to get."""
    info = entry.pretrained
    if "none" in info:
        raise FileNotFoundError(f"no pretrained weights exist for {entry.name}: {info['none']}")
    root = weights_dir()
    for rel in info["paths"]:
        if (root / rel).is_file():
            return root / rel
    tried = "\n".join(f"    {root / rel}" for rel in info["paths"])
    raise FileNotFoundError(
        f"pretrained weights for {entry.name} are not on this machine (nothing is downloaded).\n"
        f"  Get {info['source']}.\n"
        f"  Put it at one of these paths (set ${WEIGHTS_ENV} to use another folder):\n{tried}\n"
        f"  or pass checkpoint_path=... directly."
    )

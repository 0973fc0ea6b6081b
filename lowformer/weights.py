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
import zipfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ._io import atomic_write
from .errors import CheckpointError
from .models._registry import ModelEntry

_logger = logging.getLogger(__name__)

WEIGHTS_ENV = "LOWFORMER_WEIGHTS"

# What a checkpoint records so that it is used as it was trained: timm's data-config keys of the
# model's `pretrained_cfg` (plus the class names). `create_model` puts them back on the model, so
# `timm.data.resolve_data_config(model=model)` and `lowformer eval` use them.
DATA_CONFIG_KEYS = ("input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std", "label_names")
# A training checkpoint (a torch.save dict) keeps the same metadata as a safetensors file under this key.
META_KEY = "meta"


def weights_dir() -> Path:
    """Where `pretrained=True` looks: $LOWFORMER_WEIGHTS, else the user cache dir."""
    if os.environ.get(WEIGHTS_ENV):
        return Path(os.environ[WEIGHTS_ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "lowformer"


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Returns (state_dict, metadata). Unwraps training checkpoints; never executes code.

    The container is recognised from the file's first bytes, not its suffix (a safetensors file
    named `.pt` loads too), so each way a file can be unusable gets its own message.

    Raises:
        FileNotFoundError: nothing at `path`.
        IsADirectoryError: `path` is a folder (the message lists checkpoint files inside it).
        CheckpointError: empty, truncated or damaged, not a checkpoint at all, a TorchScript module,
            or a pickle that needs code execution to load.
    """
    path = Path(path)
    kind = checkpoint_container(path)
    if kind == "safetensors":
        return _read_safetensors(path)
    obj = _torch_load(path, kind)
    task = obj.get("task") if isinstance(obj, dict) else None
    if task not in (None, "classification"):  # a downstream run's checkpoint holds a whole detector / segmenter
        raise CheckpointError(
            f"{path} is a {task} training checkpoint: it holds a whole {task} model, not a classifier. "
            "Evaluate it with `lowformer detect eval` / `lowformer segment eval`, or give a classification checkpoint"
        )
    meta = obj.get(META_KEY) if isinstance(obj, dict) else None
    meta = {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}
    return unwrap_state_dict(obj, path), meta


CONTAINERS = ("safetensors", "torch zip", "torch pickle")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
_MAX_SAFETENSORS_HEADER = 100_000_000


def checkpoint_container(path: str | os.PathLike) -> str:
    """Which container `path` holds, from its first bytes: one of `CONTAINERS` ("torch zip" is what
    `torch.save` writes, "torch pickle" its legacy format). Raises as `read_checkpoint` does."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.rglob("*") if p.suffix in _CHECKPOINT_SUFFIXES and p.is_file())[:5]
        hint = f"; checkpoint files in it: {', '.join(inside)}" if inside else ""
        raise IsADirectoryError(f"checkpoint {path} is a folder, not a file; give the checkpoint file itself{hint}")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes), not a checkpoint: was its download or copy interrupted?")
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(b"PK\x03\x04"):
        return "torch zip"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "torch pickle"
    # safetensors: an 8-byte little-endian header length (at most 100 MB, as safetensors itself
    # allows), then the JSON header
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= _MAX_SAFETENSORS_HEADER:
        return "safetensors"
    raise CheckpointError(
        f"{path} is not a checkpoint: its first bytes ({head[:8].hex(' ')}) are those of neither a PyTorch file "
        "(torch.save: zip or pickle) nor a safetensors file"
    )


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = f.read(header_len) if header_len <= size - 8 else b""
    if header_len > size - 8:
        raise CheckpointError(
            f"{path} is truncated: its safetensors header needs {8 + header_len:,} bytes, the file has {size:,}; "
            "copy or download it again"
        )
    try:
        entries = json.loads(header)
        data_end = max((e["data_offsets"][1] for k, e in entries.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise CheckpointError(f"{path} is a damaged safetensors file: its header is not valid ({e})") from e
    if 8 + header_len + data_end > size:
        raise CheckpointError(
            f"{path} is truncated: its safetensors header describes {8 + header_len + data_end:,} bytes, "
            f"the file has {size:,}; copy or download it again"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path} is a damaged safetensors file: {_first_line(e)}") from e


def load_torch_file(path: str | os.PathLike) -> object:
    """What `torch.save` wrote to `path`, opened with `weights_only=True`, with `read_checkpoint`'s
    messages for a missing, empty, truncated, foreign or code-running file."""
    path = Path(path)
    kind = checkpoint_container(path)
    if kind == "safetensors":
        raise CheckpointError(f"{path} is a safetensors file (weights only), not a torch.save file")
    return _torch_load(path, kind)


def _torch_load(path: Path, kind: str) -> object:
    if kind == "torch zip":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile as e:
            raise CheckpointError(
                f"{path} is truncated or damaged: the end of its zip archive (where torch.save lists the tensors) "
                "is missing; copy or download it again"
            ) from e
        if any(n.split("/", 1)[-1].startswith("code/") for n in names):
            raise CheckpointError(
                f"{path} is a TorchScript module (torch.jit.save, e.g. written by lowformer export), not a checkpoint; "
                "give the state dict or safetensors file it was made from"
            )
    try:
        # DeiT-style training checkpoints (EdgeViT's) carry their `args` Namespace: plain attributes,
        # allowed; anything else that needs code still fails
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = _weights_unpickler_detail(e)
        if "Unsupported global" in detail or "Unsupported class" in detail:
            raise CheckpointError(
                f"refused to load {path}: it is a pickle that needs code execution to load "
                "(torch.load weights_only=True rejected it). Load it only if you trust it, then "
                "re-save its state_dict with torch.save(model.state_dict(), ...) or lowformer.save_checkpoint "
                f"(torch: {detail.split('. ')[0]})"
            ) from e
        raise CheckpointError(f"{path} is a damaged PyTorch file: its pickle cannot be read ({detail})") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        text = _first_line(e)
        if "EOF" in text or "central directory" in text:
            raise CheckpointError(f"{path} is truncated: {text}; copy or download it again") from e
        raise CheckpointError(f"{path} is a damaged PyTorch file: {text}") from e


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _weights_unpickler_detail(e: BaseException) -> str:
    """The line of torch's weights-only message that says what was rejected."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.startswith("WeightsUnpickler error:"):
            rest = line.removeprefix("WeightsUnpickler error:").strip()
            return rest or (lines[i + 1] if i + 1 < len(lines) else type(e).__name__)
    return _first_line(e)


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
    if meta.get("format") == "lowformer":
        fmt = "lowformer safetensors" if checkpoint_container(path) == "safetensors" else "lowformer torch.save"
    return native, fmt, meta


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

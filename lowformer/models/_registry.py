"""Model registry: every variant is a named builder plus what loading and counting need."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass(frozen=True)
class ModelEntry:
    """A registered variant.

    Attributes:
        name: registry name, e.g. "lowformer_b1".
        builder: `builder(**kwargs) -> nn.Module`.
        family: "lowformer" or "edgevit".
        spec: the architecture spec the builder uses (saved into our checkpoints).
        convert: `convert(state_dict, spec) -> (native_state_dict, detected_format)`.
        size_divisor: input height and width must be multiples of this (1: any size >= 32).
        classifier: state-dict prefix of the final linear layer (dropped when num_classes differs).
        paper: (params in M, MACs in M) as published; None where not published.
        pretrained: where official weights come from: {"paths": [...], "source": "..."}, or
            {"none": "reason"} when no weights exist.
    """

    name: str
    builder: Callable[..., nn.Module]
    family: str
    spec: Any
    convert: Callable[[dict, Any], tuple[dict, str]]
    classifier: str = "head.fc"
    size_divisor: int = 1
    paper: tuple[float | None, float | None] = (None, None)
    pretrained: dict = field(default_factory=dict)


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, builder: Callable[..., nn.Module], **kwargs: Any) -> ModelEntry:
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    entry = ModelEntry(name=name, builder=builder, **kwargs)
    _REGISTRY[name] = entry
    return entry


def list_models(pattern: str | None = None) -> list[str]:
    """Registered names, sorted; `pattern` is a shell wildcard such as "lowformer_b*"."""
    names = sorted(_REGISTRY)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def get_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Known models: {', '.join(list_models())}") from None

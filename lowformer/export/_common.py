"""What the export formats and the verifier share: the formats, the random input, the output contract."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import nn

_logger = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")


def check_format(format: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose from {', '.join(FORMATS)}")


def random_input(model: nn.Module, shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """A standard-normal input of `shape` (B, H, W) or (B, C, H, W) on the model's device."""
    if len(shape) == 3:
        shape = (shape[0], input_channels(model), *shape[1:])
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device_of(model))


def device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def input_channels(model: nn.Module) -> int:
    """The model's `in_chans`, else the input channels of its first conv, else 3."""
    chans = getattr(model, "in_chans", None)
    if isinstance(chans, int):
        return chans
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else 3


def as_list(out: object) -> list[torch.Tensor]:
    """A model's output as a list of tensors: what every export format can carry."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in out):
        return list(out)
    raise TypeError(f"export needs a model that returns a tensor or a list of tensors, got {type(out).__name__}")


@contextmanager
def logged_warnings(what: str):
    """Turn the exporters' warnings (deprecations, tracer notes) into debug log records."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        _logger.debug("%s: %s", what, w.message)

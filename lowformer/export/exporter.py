"""`export`: write a model as an ONNX graph or a TorchScript module, through the one atomic writer."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from .._io import atomic_write, check_writable
from ..factory import check_image_size
from ._common import check_format, random_input
from .fp16 import MIN_FP16_OPSET
from .onnx import DEFAULT_EXPORTER, DEFAULT_OPSET, check_exporter, onnx_bytes
from .torchscript import save_torchscript

_logger = logging.getLogger(__name__)


def export(
    model: nn.Module,
    path: str | os.PathLike,
    format: str = "onnx",
    image_size: tuple[int, int] = (224, 224),
    dynamic_batch: bool = False,
    dynamic_size: bool = False,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    *,
    batch_size: int = 1,
    example_input: torch.Tensor | None = None,
    metadata: dict[str, str] | None = None,
    exporter: str | None = None,
) -> Path:
    """Write `model` (put in eval mode) as an ONNX graph or a TorchScript module; returns the path.

    Args:
        model: the module to export; its output is a tensor or a list/tuple of tensors.
        path: the file to write; its folder is created. It is checked for writability before the
            export starts, and written to a temporary file that is renamed over it when complete,
            so a failed export leaves no partial file and an existing file untouched.
        format: "onnx" or "torchscript".
        image_size: (H, W) of the random input the model is traced with; it must pass the input
            rule of `lowformer.factory.check_image_size` (>= 32; EdgeViT: multiples of 32).
        dynamic_batch: ONNX: leave the batch dimension symbolic ("batch").
        dynamic_size: ONNX: leave height and width symbolic ("height", "width").
        fp16: ONNX only: float16 weights and activations, softmax/norms/attention logits in
            float32, float32 inputs and outputs (see `convert_float16`).
        opset: ONNX opset version (the dynamo exporter writes >= 18; fp16 needs >= 17).
        batch_size: batch of the trace input.
        example_input: trace with this tensor instead (its shape is then the exported shape).
        metadata: extra strings stored in the file (ONNX metadata_props; TorchScript extra file
            "lowformer.json").
        exporter: ONNX only: "dynamo" (default; `torch.export`, then onnxscript's translation) or
            "torchscript" (the legacy exporter, deprecated upstream: for a model `torch.export`
            cannot capture, or an opset below 18; torch's deprecation warning is passed on as a
            `FutureWarning`).

    Raises:
        ValueError: bad arguments (format, exporter, fp16 with TorchScript or an old opset, image size).
        OutputError: `path` cannot be written (read-only, a folder in the way, disk full).
        LowformerRuntimeError: the dynamo exporter cannot capture the model, or cannot leave the
            dimensions asked for dynamic (the message suggests `exporter="torchscript"`, or a fixed
            shape).

    TorchScript: `torch.jit.trace`, then `torch.jit.freeze`. The traced graph reads shapes with
    `aten::size`, so it runs at other batch sizes and image sizes; `verify` proves it for the
    shapes asked. NOTE: `torch.jit.optimize_for_inference` is not applied to the file (see
    `torchscript_module`); apply it after loading.
    """
    check_format(format)
    if format != "onnx" and exporter is not None:
        raise ValueError(f"exporter={exporter!r} applies to ONNX; a TorchScript file is always traced")
    if fp16 and format != "onnx":
        raise ValueError(
            "fp16 export is ONNX only; for TorchScript export fp32 and run it under torch.autocast, "
            "which keeps softmax and normalisations in fp32 itself"
        )
    if fp16 and opset < MIN_FP16_OPSET:
        raise ValueError(f"fp16 export needs opset >= {MIN_FP16_OPSET} (single-operator LayerNormalization)")
    exporter = exporter or DEFAULT_EXPORTER
    if format == "onnx":
        check_exporter(exporter, opset)
    model.eval()
    if example_input is None:
        example_input = random_input(model, (batch_size, *image_size))
    check_image_size(model, tuple(example_input.shape[-2:]))
    path = check_writable(path)
    meta = {
        "lowformer.model": str(getattr(model, "variant", type(model).__name__)),
        "lowformer.input_shape": json.dumps(list(example_input.shape)),
        "lowformer.dynamic_batch": json.dumps(dynamic_batch),
        "lowformer.dynamic_size": json.dumps(dynamic_size),
        "lowformer.precision": "fp16" if fp16 else "fp32",
        **(metadata or {}),
    }
    if format == "onnx":
        data = onnx_bytes(model, example_input, dynamic_batch, dynamic_size, fp16, opset, meta, exporter)
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    else:
        atomic_write(path, lambda tmp: save_torchscript(model, example_input, tmp, meta))
    _logger.info("exported %s (%s) to %s", meta["lowformer.model"], format, path)
    return path

"""Export a model for deployment runtimes. For now: ONNX, as the ONNX Runtime benchmark needs it."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

_logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: torch.Tensor,
    dynamic_batch: bool = False,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Write `model` (in eval mode) as an ONNX graph with input "input" and output "output".

    Args:
        model: the module to export; it is put in eval mode.
        path: the .onnx file to write.
        example_input: a tensor of the input shape (B, C, H, W) the graph is traced with.
        dynamic_batch: leave the batch dimension symbolic ("batch") instead of fixed to B.
        opset: ONNX opset version.

    NOTE: this uses the TorchScript-based exporter (`dynamo=False`). The newer exporter needs the
    `onnxscript` package, which is not a dependency; the TorchScript one is deprecated upstream but
    handles every model in the registry and the timm peers we compare with.
    """
    model.eval()
    path = Path(path)
    dynamic_axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.onnx.export(
            model,
            (example_input,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )
    for w in caught:
        _logger.debug("onnx export: %s", w.message)
    _logger.info("exported ONNX opset %d to %s", opset, path)
    return path

"""Export a model to ONNX or TorchScript, and prove the exported file computes what the model does.

ONNX goes through torch's dynamo exporter (`torch.export`, then onnxscript) by default; the
TorchScript-based exporter stays as the fallback (`exporter="torchscript"`), deprecated upstream.
The TorchScript format serves the LowFormer papers' latency presets (`lowformer bench`).

`export` writes the file (atomically, through `lowformer._io`); `verify` runs it (ONNX through ONNX
Runtime, TorchScript through `torch.jit.load`) on random inputs, at every shape its dynamic axes
promise, and compares with PyTorch. Whether to `lowformer.deploy` the model first is the caller's
choice; the `lowformer export` command deploys by default.

One module per job: `onnx` (the graph, and running it), `fp16` (the mixed-precision rewrite of an
ONNX graph), `torchscript` (trace, freeze, save, load), `verifier` (the comparison and its report),
`exporter` (`export`, the entry point). Method and limits: docs/export.md.
"""

from ._common import FORMATS, input_channels, random_input
from .exporter import export
from .fp16 import KEEP_FP32_OPS, MIN_FP16_OPSET, convert_float16
from .onnx import DEFAULT_EXPORTER, DEFAULT_OPSET, EXPORTERS, MIN_DYNAMO_OPSET, dynamic_axes_of, output_names
from .torchscript import torchscript_module
from .verifier import FP16_BOUND, FP32_BOUND, ShapeCheck, VerifyReport, verify, verify_shapes

__all__ = [
    "DEFAULT_EXPORTER",
    "DEFAULT_OPSET",
    "EXPORTERS",
    "FORMATS",
    "FP16_BOUND",
    "FP32_BOUND",
    "KEEP_FP32_OPS",
    "MIN_DYNAMO_OPSET",
    "MIN_FP16_OPSET",
    "ShapeCheck",
    "VerifyReport",
    "convert_float16",
    "dynamic_axes_of",
    "export",
    "input_channels",
    "output_names",
    "random_input",
    "torchscript_module",
    "verify",
    "verify_shapes",
]

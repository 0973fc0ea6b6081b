"""ONNX: the graph of a model (fp32, or fp16 through `fp16.convert_float16`), and running a written
graph on ONNX Runtime for verification.

Two exporters write the graph. "dynamo" (the default): `torch.onnx.export(..., dynamo=True)`, which
captures the model with `torch.export` and translates the ATen graph with onnxscript's library.
"torchscript": the legacy exporter (`dynamo=False`), which traces the model with TorchScript;
deprecated upstream and kept as the fallback for a model that `torch.export` cannot capture.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import LowformerRuntimeError
from ._common import as_list, logged_warnings
from .fp16 import KEEP_FP32_OPS, convert_float16

_logger = logging.getLogger(__name__)

EXPORTERS = ("dynamo", "torchscript")
DEFAULT_EXPORTER = "dynamo"
# NOTE: 18 is the opset torch's ONNX function library (onnxscript's torchlib) is written for; the
# dynamo exporter builds every graph there and reaches a lower opset only by running the ONNX
# version converter, which fails on our graphs (ReduceMean's axes moved from attribute to input),
# so it is refused. Every maintained runtime reads opset 18 (ONNX Runtime >= 1.14, TensorRT >= 8.6).
DEFAULT_OPSET = 18
MIN_DYNAMO_OPSET = 18
# The dynamic dimensions of the image input, by axis.
_DYNAMIC_AXES = {0: "batch", 2: "height", 3: "width"}


def check_exporter(exporter: str, opset: int) -> None:
    """Raise ValueError for an unknown exporter, or an opset the exporter does not write."""
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown ONNX exporter {exporter!r}; choose from {', '.join(EXPORTERS)}")
    if exporter == "dynamo" and opset < MIN_DYNAMO_OPSET:
        raise ValueError(
            f"the dynamo ONNX exporter writes opset {MIN_DYNAMO_OPSET} or later, not {opset}; for an older "
            'opset use the TorchScript-based exporter (--exporter torchscript; Python: exporter="torchscript")'
        )


def output_names(num_outputs: int) -> list[str]:
    return ["output"] if num_outputs == 1 else [f"output_{i}" for i in range(num_outputs)]


def input_axes(dynamic_batch: bool, dynamic_size: bool) -> dict[int, str]:
    """The symbolic dimensions of the image input: {axis: name}."""
    wanted = ([0] if dynamic_batch else []) + ([2, 3] if dynamic_size else [])
    return {axis: _DYNAMIC_AXES[axis] for axis in wanted}


def dynamic_axes_of(
    num_outputs: int, output_ranks: Sequence[int], dynamic_batch: bool, dynamic_size: bool
) -> dict[str, dict[int, str]]:
    """The TorchScript-based exporter's `dynamic_axes` for input "input" and the outputs.

    The dynamo exporter needs no output axes: it derives each output dimension from the input's
    (a feature map's height becomes e.g. `((height - 1)//4) + 1`)."""
    axes: dict[str, dict[int, str]] = {}
    inp = input_axes(dynamic_batch, dynamic_size)
    if inp:
        axes["input"] = inp
    for name, rank in zip(output_names(num_outputs), output_ranks):
        out = {0: "batch"} if dynamic_batch else {}
        if dynamic_size and rank == 4:  # feature maps scale with the input
            out.update({2: f"{name}_height", 3: f"{name}_width"})
        if out:
            axes[name] = out
    return axes


def onnx_bytes(
    model: nn.Module,
    x: torch.Tensor,
    dynamic_batch: bool,
    dynamic_size: bool,
    fp16: bool,
    opset: int,
    metadata: dict[str, str],
    exporter: str = DEFAULT_EXPORTER,
) -> bytes:
    """The serialised ONNX model, checked by `onnx.checker`, with `metadata` as its metadata_props.

    Raises:
        ValueError: an unknown exporter, or an opset it does not write.
        LowformerRuntimeError: the dynamo exporter cannot capture the model, or cannot leave the
            dimensions asked for dynamic (the message says what to do instead).
    """
    import onnx

    check_exporter(exporter, opset)
    with torch.no_grad():
        outputs = as_list(model(x))
    names = output_names(len(outputs))
    if exporter == "dynamo":
        label = metadata.get("lowformer.model", type(model).__name__)
        proto = _dynamo_graph(model, x, names, input_axes(dynamic_batch, dynamic_size), opset, label)
    else:
        axes = dynamic_axes_of(len(outputs), [t.dim() for t in outputs], dynamic_batch, dynamic_size)
        proto = _torchscript_graph(model, x, names, axes, opset)
    written = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if written != opset:  # never state an opset the file does not have
        raise LowformerRuntimeError(f"the {exporter} exporter wrote opset {written}, not the {opset} asked for")
    metadata = {**metadata, "lowformer.exporter": exporter}
    if fp16:
        proto = convert_float16(proto)
        metadata["lowformer.fp32_ops"] = ",".join(sorted(KEEP_FP32_OPS)) + ",attention-logits"
    onnx.helper.set_model_props(proto, metadata)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def _dynamo_graph(model: nn.Module, x: torch.Tensor, names: list[str], axes: dict[int, str], opset: int, label: str):
    """`torch.onnx.export(dynamo=True)`: the `torch.export` graph translated to ONNX and optimised.

    Each dynamic axis is passed by name, which torch turns into `Dim.DYNAMIC` (the range is left to
    `torch.export` to infer) and gives that name in the graph. NOTE: the size rule (>= 32,
    multiples of `size_divisor_of`) is not a range constraint here: `torch.export` narrows it
    itself (e.g. height >= 33 for LowFormer, where the last stage stops being 1x1), but an ONNX
    graph carries no ranges, and `verify` runs the file at the sizes it promises; `export` refuses
    sizes outside the rule up front.
    """
    try:
        import onnxscript  # noqa: F401  (torch imports it inside; say what to install here)
    except ImportError as e:
        raise LowformerRuntimeError(
            "the dynamo ONNX exporter needs the onnxscript package: pip install 'lowformer[onnx]' "
            '(or use the TorchScript-based exporter: --exporter torchscript; Python: exporter="torchscript")'
        ) from e
    try:
        return _run_dynamo(model, x, names, (axes,) if axes else None, opset).model_proto
    except torch.onnx.errors.OnnxExporterError as e:
        fallback = 'the TorchScript-based exporter (--exporter torchscript; Python: exporter="torchscript")'
        if axes:  # e.g. a ViT whose position embeddings fix the image size
            dims = "/".join(axes.values())
            what = f"{label} with a dynamic {dims}"
            hint = f"if the model needs a fixed {dims}, export without the dynamic option; otherwise try {fallback}"
        else:
            what, hint = label, f"export it with {fallback} instead"
        raise LowformerRuntimeError(
            f"the dynamo ONNX exporter cannot export {what}: {_summary(e.__cause__ or e)}; {hint}"
        ) from e


def _run_dynamo(model: nn.Module, x: torch.Tensor, names: list[str], dynamic_shapes, opset: int):
    """`torch.onnx.export(dynamo=True)` with its warnings and prints sent to the debug log."""
    printed = io.StringIO()
    try:
        # NOTE: a failing torch.export prints its partial graph to stderr; it goes to the debug log
        # with the warnings, so that the failure is one message, as everywhere in the package
        with torch.no_grad(), logged_warnings("onnx export (dynamo)"), contextlib.redirect_stderr(printed):
            return torch.onnx.export(
                model,
                (x,),
                dynamo=True,
                opset_version=opset,
                input_names=["input"],
                output_names=names,
                dynamic_shapes=dynamic_shapes,
                verbose=False,  # torch prints its progress otherwise
            )
    finally:
        if printed.getvalue():
            _logger.debug("onnx export (dynamo) printed:\n%s", printed.getvalue())


def _torchscript_graph(
    model: nn.Module, x: torch.Tensor, names: list[str], axes: dict[str, dict[int, str]], opset: int
):
    """The legacy exporter (`dynamo=False`). torch deprecates it: that warning is passed on to the
    caller of `export` as a `FutureWarning` (Python shows those by default: the user chose this
    exporter), the tracer's other notes go to the debug log."""
    import onnx

    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.onnx.export(
            model,
            (x,),
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=["input"],
            output_names=names,
            dynamic_axes=axes,
            do_constant_folding=True,
        )
    for w in caught:
        # torch addresses its deprecation of this exporter to the caller of torch.onnx.export (this
        # file); its deprecations of its own helpers, and the tracer's notes, are not the user's
        if issubclass(w.category, (DeprecationWarning, FutureWarning)) and _same_file(w.filename, __file__):
            warnings.warn(str(w.message), FutureWarning, stacklevel=4)  # here, onnx_bytes, export, its caller
        else:
            _logger.debug("onnx export (torchscript): %s", w.message)
    return onnx.load_model_from_string(buffer.getvalue())


def _same_file(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _summary(e: BaseException) -> str:
    """An exception as one line: its type and first line (with the next one, when the first ends in
    a colon, as torch's "Found the following conflicts ...:" does)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else (lines[0] if lines else "")
    text = text.rstrip(".")  # the caller goes on after a semicolon
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def onnx_runner(path: str | os.PathLike):
    """A function running the graph on ONNX Runtime's CPU provider: x -> (outputs, the names of the
    fp16 tensors inside the graph that hold inf or nan)."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    num_outputs = len(model.graph.output)
    inferred = onnx.shape_inference.infer_shapes(model)
    fp16 = [v.name for v in inferred.graph.value_info if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16]
    for name in fp16:  # fetched as extra outputs, so ONNX Runtime materialises them in fp16
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT16, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    dtype = np.float16 if inp.type == "tensor(float16)" else np.float32

    def run(x: torch.Tensor) -> tuple[list[torch.Tensor], list[str]]:
        outs = session.run(None, {inp.name: x.cpu().numpy().astype(dtype)})
        overflowed = [name for name, t in zip(fp16, outs[num_outputs:]) if not np.isfinite(t).all()]
        return [torch.from_numpy(np.asarray(o, dtype=np.float32)) for o in outs[:num_outputs]], overflowed

    return run

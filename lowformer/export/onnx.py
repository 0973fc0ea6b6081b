"""ONNX: the graph of a model (fp32, or fp16 through `fp16.convert_float16`), and running a written
graph on ONNX Runtime for verification."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import torch
from torch import nn

from ._common import as_list, logged_warnings
from .fp16 import KEEP_FP32_OPS, convert_float16

DEFAULT_OPSET = 17


def output_names(num_outputs: int) -> list[str]:
    return ["output"] if num_outputs == 1 else [f"output_{i}" for i in range(num_outputs)]


def dynamic_axes_of(
    num_outputs: int, output_ranks: Sequence[int], dynamic_batch: bool, dynamic_size: bool
) -> dict[str, dict[int, str]]:
    """The `torch.onnx.export` dynamic_axes for input "input" and the outputs."""
    axes: dict[str, dict[int, str]] = {}
    names = output_names(num_outputs)
    inp = {}
    if dynamic_batch:
        inp[0] = "batch"
    if dynamic_size:
        inp.update({2: "height", 3: "width"})
    if inp:
        axes["input"] = inp
    for name, rank in zip(names, output_ranks):
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
) -> bytes:
    """The serialised ONNX model, checked by `onnx.checker`, with `metadata` as its metadata_props.

    NOTE: this uses the TorchScript-based exporter (`dynamo=False`). The newer exporter needs the
    `onnxscript` package, which is not a dependency; the TorchScript one is deprecated upstream but
    handles every model in the registry and the timm peers we compare with.
    """
    import onnx

    with torch.no_grad():
        outputs = as_list(model(x))
    names = output_names(len(outputs))
    buffer = io.BytesIO()
    with torch.no_grad(), logged_warnings("onnx export"):
        torch.onnx.export(
            model,
            (x,),
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=["input"],
            output_names=names,
            dynamic_axes=dynamic_axes_of(len(outputs), [t.dim() for t in outputs], dynamic_batch, dynamic_size),
            do_constant_folding=True,
        )
    proto = onnx.load_model_from_string(buffer.getvalue())
    if fp16:
        proto = convert_float16(proto)
        metadata = {**metadata, "lowformer.fp32_ops": ",".join(sorted(KEEP_FP32_OPS)) + ",attention-logits"}
    onnx.helper.set_model_props(proto, metadata)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


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

"""Export a model to ONNX or TorchScript, and prove the exported file computes what the model does.

`export` writes the file (atomically: a temporary file in the same folder, then a rename, so a
failed export leaves nothing half-written); `verify` runs it (ONNX through ONNX Runtime,
TorchScript through `torch.jit.load`) on random inputs, at every shape its dynamic axes promise,
and compares with PyTorch. Whether to `lowformer.deploy` the model first is the caller's choice;
the `lowformer export` command deploys by default.

fp16 ONNX (`fp16=True`): the fp32 graph is exported, then `convert_float16` rewrites it: weights
and activations become float16, except the operators that overflow or lose too much precision in
half precision, which keep computing in float32 (`KEEP_FP32_OPS`: softmax, the normalisations,
reductions, powers; plus the attention logits, i.e. the QK^T MatMul and its scaling feeding each
Softmax, because QK^T is what overflows first, EfficientViT #116/#142). Casts are inserted where
the two regions meet; the graph's inputs and outputs stay float32, so an fp16 file is a drop-in
replacement for the fp32 one. Method and limits: docs/export.md.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import secrets
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

_logger = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
DEFAULT_OPSET = 17
MIN_FP16_OPSET = 17  # LayerNormalization is one operator from opset 17; below, it is decomposed
FP32_BOUND = 1e-4
FP16_BOUND = 1e-2
KEEP_FP32_OPS = frozenset(
    {
        "Softmax",
        "LogSoftmax",
        "LayerNormalization",
        "InstanceNormalization",  # GroupNorm exports as Reshape -> InstanceNormalization -> Reshape
        "GroupNormalization",
        "BatchNormalization",
        "ReduceMean",  # global average pooling and decomposed norms: sums over many elements
        "ReduceSum",
        "ReduceSumSquare",
        "ReduceL2",
        "Pow",  # x**3 in tanh-GELU and x**2 in decomposed norms overflow first
    }
)
# Operators whose float inputs may be of either precision (Cast converts, Shape/Size read shapes).
_TYPE_FREE_OPS = frozenset({"Cast", "Shape", "Size"})
# (operator, input index) that ONNX types as float32 whatever the data's precision.
_FP32_INPUTS = frozenset({("Resize", 2), ("Upsample", 1)})


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


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
) -> Path:
    """Write `model` (put in eval mode) as an ONNX graph or a TorchScript module; returns the path.

    Args:
        model: the module to export; its output is a tensor or a list/tuple of tensors.
        path: the file to write; its folder is created.
        format: "onnx" or "torchscript".
        image_size: (H, W) of the random input the model is traced with; for models with a
            `size_divisor` (EdgeViT: 32) both must be multiples of it.
        dynamic_batch: ONNX: leave the batch dimension symbolic ("batch").
        dynamic_size: ONNX: leave height and width symbolic ("height", "width").
        fp16: ONNX only: float16 weights and activations, softmax/norms/attention logits in
            float32, float32 inputs and outputs (see `convert_float16`).
        opset: ONNX opset version (fp16 needs >= 17).
        batch_size: batch of the trace input.
        example_input: trace with this tensor instead (its shape is then the exported shape).
        metadata: extra strings stored in the file (ONNX metadata_props; TorchScript extra file
            "lowformer.json").

    TorchScript: `torch.jit.trace`, then `torch.jit.freeze`. The traced graph reads shapes with
    `aten::size`, so it runs at other batch sizes and image sizes; `verify` proves it for the
    shapes asked. NOTE: `torch.jit.optimize_for_inference` is not applied to the file: on CPU it
    bakes MKL-DNN weights into the graph, which `torch.jit.load` cannot read back; apply it after
    loading (`torchscript_module(..., optimize=True)` does, for the benchmark).
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose from {', '.join(FORMATS)}")
    if fp16 and format != "onnx":
        raise ValueError(
            "fp16 export is ONNX only; for TorchScript export fp32 and run it under torch.autocast, "
            "which keeps softmax and normalisations in fp32 itself"
        )
    if fp16 and opset < MIN_FP16_OPSET:
        raise ValueError(f"fp16 export needs opset >= {MIN_FP16_OPSET} (single-operator LayerNormalization)")
    model.eval()
    if example_input is None:
        example_input = random_input(model, (batch_size, *image_size))
    check_image_size(model, tuple(example_input.shape[-2:]))
    path = Path(path)
    meta = {
        "lowformer.model": str(getattr(model, "variant", type(model).__name__)),
        "lowformer.input_shape": json.dumps(list(example_input.shape)),
        "lowformer.dynamic_batch": json.dumps(dynamic_batch),
        "lowformer.dynamic_size": json.dumps(dynamic_size),
        "lowformer.precision": "fp16" if fp16 else "fp32",
        **(metadata or {}),
    }
    if format == "onnx":
        data = _onnx_bytes(model, example_input, dynamic_batch, dynamic_size, fp16, opset, meta)
        _write_atomic(path, lambda f: f.write(data))
    else:
        module = torchscript_module(model, example_input, optimize=False)
        extra = {"lowformer.json": json.dumps(meta)}

        def save(f) -> None:
            with _logged_warnings("torchscript"):
                torch.jit.save(module, f, _extra_files=extra)

        _write_atomic(path, save)
    _logger.info("exported %s (%s) to %s", meta["lowformer.model"], format, path)
    return path


def random_input(model: nn.Module, shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """A standard-normal input of `shape` (B, H, W) or (B, C, H, W) on the model's device."""
    if len(shape) == 3:
        shape = (shape[0], input_channels(model), *shape[1:])
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(_device_of(model))


def _device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def input_channels(model: nn.Module) -> int:
    """The model's `in_chans`, else the input channels of its first conv, else 3."""
    chans = getattr(model, "in_chans", None)
    if isinstance(chans, int):
        return chans
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else 3


def check_image_size(model: nn.Module, image_size: tuple[int, int]) -> None:
    """Raise ValueError unless H and W are multiples of the model's `size_divisor` (if it has one)."""
    divisor = size_divisor_of(model)
    h, w = image_size
    if h % divisor or w % divisor:
        raise ValueError(
            f"{getattr(model, 'variant', type(model).__name__)} needs height and width that are multiples of "
            f"{divisor}, got {h}x{w}"
        )


def size_divisor_of(model: nn.Module) -> int:
    divisors = [m.size_divisor for m in model.modules() if isinstance(getattr(m, "size_divisor", None), int)]
    return max(divisors, default=1)


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


def output_names(num_outputs: int) -> list[str]:
    return ["output"] if num_outputs == 1 else [f"output_{i}" for i in range(num_outputs)]


def _as_list(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in out):
        return list(out)
    raise TypeError(f"export needs a model that returns a tensor or a list of tensors, got {type(out).__name__}")


def _onnx_bytes(
    model: nn.Module,
    x: torch.Tensor,
    dynamic_batch: bool,
    dynamic_size: bool,
    fp16: bool,
    opset: int,
    metadata: dict[str, str],
) -> bytes:
    """The serialised ONNX model.

    NOTE: this uses the TorchScript-based exporter (`dynamo=False`). The newer exporter needs the
    `onnxscript` package, which is not a dependency; the TorchScript one is deprecated upstream but
    handles every model in the registry and the timm peers we compare with.
    """
    import onnx

    with torch.no_grad():
        outputs = _as_list(model(x))
    names = output_names(len(outputs))
    buffer = io.BytesIO()
    with torch.no_grad(), _logged_warnings("onnx export"):
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


def torchscript_module(model: nn.Module, example_input: torch.Tensor, optimize: bool = False) -> torch.jit.ScriptModule:
    """`torch.jit.trace`, `torch.jit.freeze`, and with `optimize` `torch.jit.optimize_for_inference`.

    NOTE: the official LowFormer code scripts (`torch.jit.script`); we trace, because not every timm
    peer scripts. Traced shapes stay symbolic (`aten::size`): LowTention's crop `out[..., :H, :W]`
    follows the input, which `verify` checks at an odd size. The optimised module cannot be saved
    (see `export`).
    """
    model.eval()
    with torch.no_grad(), _logged_warnings("torchscript"):
        # NOTE: the tracer warns about F.group_norm's batch-size check (a Python bool); it only
        # guards against one value per channel in training, so baking it in is harmless.
        traced = torch.jit.trace(model, example_input, check_trace=False)
        module = torch.jit.freeze(traced.eval())
        if optimize:
            module = torch.jit.optimize_for_inference(module)
    return module


@contextmanager
def _logged_warnings(what: str):
    """Turn the exporters' warnings (deprecations, tracer notes) into debug log records."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        _logger.debug("%s: %s", what, w.message)


def _write_atomic(path: Path, write: Callable[[io.BufferedWriter], object]) -> None:
    """Write through `write(file)` to a temporary file next to `path`, then rename it to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # NOTE: not tempfile.mkstemp, whose files are private (0600); "x" mode honours the umask
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------
# fp16 conversion of an ONNX graph
# --------------------------------------------------------------------------------------------


def convert_float16(model, keep_fp32_ops: frozenset[str] = KEEP_FP32_OPS, attention_logits_fp32: bool = True):
    """An fp16 copy of an fp32 ONNX model (`onnx.ModelProto`), mixed precision where it must be.

    Which node computes in float32:
      * nodes whose type is in `keep_fp32_ops` (softmax, normalisations, reductions, Pow);
      * with `attention_logits_fp32`, the attention logits: walking back from each Softmax through
        elementwise ops to the MatMul that computes QK^T, that MatMul and the Mul/Div scaling its
        inputs (torch exports scaled_dot_product_attention as q*sqrt(s) @ (k^T*sqrt(s)));
      * shape arithmetic: float nodes that do not depend on the input's values (Cast(Shape) ->
        Sqrt -> Div computing the attention scale), so such scalars are not rounded to fp16.
    Every other node computes in float16. Initializers and constants are stored in the precision
    their consumers use (both, if needed); a Cast is inserted on every edge that crosses between
    the two regions; the graph's float inputs and outputs stay float32.

    Raises ValueError for graphs this converter does not handle (control flow, untyped values).
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        raise ValueError("fp16 conversion does not handle control flow (If/Loop/Scan subgraphs)")
    if any(n.domain not in ("", "ai.onnx") for n in graph.node):
        raise ValueError("fp16 conversion handles only standard ONNX operators")
    FP32, FP16 = TensorProto.FLOAT, TensorProto.FLOAT16

    # Float constants become initializers, and Identity nodes on initializers (the exporter's
    # shared weights) become copies, so that all constants are handled alike.
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    nodes = []
    for n in graph.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            array = numpy_helper.to_array(n.attribute[0].t)
            if array.dtype == np.float32:
                initializers[n.output[0]] = array
                continue
        if n.op_type == "Identity" and n.input[0] in initializers:
            initializers[n.output[0]] = initializers[n.input[0]]
            continue
        nodes.append(n)

    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    elem_type = {t.name: t.data_type for t in graph.initializer}
    for vi in (*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info):
        elem_type[vi.name] = vi.type.tensor_type.elem_type
    for name, array in initializers.items():
        elem_type[name] = helper.np_dtype_to_tensor_dtype(array.dtype)
    for n in nodes:
        for out in n.output:
            if out and out not in elem_type:
                raise ValueError(f"shape inference left {out!r} (output of {n.op_type} {n.name!r}) untyped")
    if any(t == TensorProto.DOUBLE for t in elem_type.values()):
        _logger.warning("fp16 conversion leaves float64 tensors as they are")

    def is_float(name: str) -> bool:
        return elem_type.get(name) == FP32

    # Which values depend on the input's values (not only on its shape).
    graph_inputs = {i.name for i in graph.input if i.name not in initializers}
    dependent = set(graph_inputs)
    for n in nodes:  # ONNX nodes are topologically sorted
        if n.op_type not in ("Shape", "Size") and any(i in dependent for i in n.input if i):
            dependent.update(o for o in n.output if o)

    producer = {o: n for n in nodes for o in n.output if o}
    fp32_nodes = {id(n) for n in nodes if n.op_type in keep_fp32_ops}
    fp32_nodes |= {id(n) for n in nodes if not any(o in dependent for o in n.output)}  # shape arithmetic
    if attention_logits_fp32:
        for n in nodes:
            if n.op_type == "Softmax":
                fp32_nodes |= {id(m) for m in _attention_logits(n, producer, dependent)}

    def precision(n) -> int:
        return FP32 if id(n) in fp32_nodes else FP16

    # Rewrite: every node reads its float inputs in its own precision.
    new_nodes = []
    new_inits: dict[str, np.ndarray] = {}
    storage: dict[str, int] = {name: FP32 for name in graph_inputs if is_float(name)}
    casts: dict[tuple[str, int], str] = {}

    def read(name: str, want: int) -> str:
        """The name of `name` in precision `want`, adding an initializer copy or a Cast as needed."""
        if name in initializers:
            key = name if want == FP32 else f"{name}__fp16"
            if key not in new_inits:
                array = initializers[name]
                new_inits[key] = _to_fp16(array, name) if want == FP16 else array.astype(np.float32)
            return key
        if storage[name] == want:
            return name
        if (name, want) not in casts:
            cast = f"{name}__to_{'fp32' if want == FP32 else 'fp16'}"
            new_nodes.append(helper.make_node("Cast", [name], [cast], name=cast, to=want))
            casts[(name, want)] = cast
        return casts[(name, want)]

    for n in nodes:
        want = precision(n)
        for k, name in enumerate(n.input):
            if name and is_float(name) and (n.op_type, k) in _FP32_INPUTS:
                n.input[k] = read(name, FP32)
            elif name and is_float(name) and n.op_type not in _TYPE_FREE_OPS:
                n.input[k] = read(name, want)
            elif name in initializers and is_float(name):  # a Cast/Shape reading a float constant
                n.input[k] = read(name, FP32)
        if n.op_type == "Cast" and want == FP16:  # e.g. Cast(bool mask -> float) in the fp16 region
            for a in n.attribute:
                if a.name == "to" and a.i == FP32:
                    a.i = FP16
        for out in n.output:
            if out and is_float(out):
                storage[out] = want
        new_nodes.append(n)

    # Float graph outputs stay fp32: rename the fp16 producer's output and cast back.
    for out in graph.output:
        if is_float(out.name) and storage.get(out.name) == FP16:
            inner = f"{out.name}__fp16"
            for n in new_nodes:
                for k, name in enumerate(n.output):
                    if name == out.name:
                        n.output[k] = inner
                for k, name in enumerate(n.input):
                    if name == out.name:
                        n.input[k] = inner
            new_nodes.append(helper.make_node("Cast", [inner], [out.name], name=f"{out.name}__to_fp32", to=FP32))
        elif out.name in initializers:
            new_inits[out.name] = initializers[out.name]

    # Casts must come right after their producer: sort topologically.
    graph.ClearField("node")
    graph.node.extend(_topological(new_nodes, set(graph_inputs) | set(new_inits)))
    graph.ClearField("initializer")
    graph.initializer.extend(numpy_helper.from_array(a, name) for name, a in new_inits.items())
    graph.ClearField("value_info")
    onnx.checker.check_model(model, full_check=True)
    return model


def _attention_logits(softmax, producer: dict, dependent: set[str]) -> list:
    """The nodes computing a Softmax's logits back to QK^T: elementwise ops, the MatMul, its scaling."""
    elementwise = ("Add", "Sub", "Mul", "Div", "Where")
    found = []
    node = producer.get(softmax.input[0]) if softmax.input[0] in dependent else None
    while node is not None:
        if node.op_type == "MatMul":
            found.append(node)
            for name in node.input:
                scale = producer.get(name)
                if scale is not None and scale.op_type in ("Mul", "Div") and name in dependent:
                    found.append(scale)
            return found
        if node.op_type not in elementwise:
            return []  # not an attention pattern we know: leave it
        found.append(node)
        data = [i for i in node.input if i in dependent]
        if len(data) != 1:
            return []
        node = producer.get(data[0])
    return []


def _to_fp16(array, name: str):
    import numpy as np

    limit = float(np.finfo(np.float16).max)
    if array.size and float(np.abs(array).max()) > limit:
        _logger.warning("%s has values beyond the fp16 range; they are clipped to +-%g", name, limit)
        array = np.clip(array, -limit, limit)
    return array.astype(np.float16)


def _topological(nodes: list, available: set[str]) -> list:
    """`nodes` in an order where every node comes after the producers of its inputs."""
    known = set(available)
    pending = list(nodes)
    ordered = []
    while pending:
        rest = []
        for n in pending:
            if all(not i or i in known for i in n.input):
                ordered.append(n)
                known.update(o for o in n.output if o)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            missing = sorted({i for n in rest for i in n.input if i and i not in known})[:5]
            raise ValueError(f"fp16 conversion produced a graph with unresolved inputs: {missing}")
        pending = rest
    return ordered


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------


@dataclass
class ShapeCheck:
    """The comparison at one input shape."""

    input_shape: tuple[int, ...]
    max_abs_err: float
    max_rel_err: float  # max|exported - torch| / max|torch|, the worst output
    finite: bool  # outputs and, in an fp16 graph, every fp16 tensor inside it
    overflowed: list[str] = field(default_factory=list)  # fp16 tensors holding inf/nan


@dataclass
class VerifyReport:
    """The exported file against PyTorch on random standard-normal inputs."""

    format: str
    precision: str
    bound: float  # on max_rel_err
    checks: list[ShapeCheck] = field(default_factory=list)

    @property
    def max_abs_err(self) -> float:
        return max(c.max_abs_err for c in self.checks)

    @property
    def max_rel_err(self) -> float:
        return max(c.max_rel_err for c in self.checks)

    @property
    def finite(self) -> bool:
        return all(c.finite for c in self.checks)

    @property
    def passed(self) -> bool:
        return self.finite and self.max_rel_err <= self.bound

    @property
    def input_shapes(self) -> list[tuple[int, ...]]:
        return [c.input_shape for c in self.checks]

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "max_abs_err": self.max_abs_err,
            "max_rel_err": self.max_rel_err,
            "finite": self.finite,
            "passed": self.passed,
        }

    def summary(self) -> str:
        shapes = ", ".join("x".join(map(str, s)) for s in self.input_shapes)
        overflowed = list(dict.fromkeys(name for c in self.checks for name in c.overflowed))  # graph order
        verdict = "ok" if self.passed else "FAILED"
        if overflowed:
            verdict += f": {len(overflowed)} fp16 tensors overflow, the first {overflowed[0]}"
        elif not self.finite:
            verdict += ": outputs not finite"
        op = "<=" if self.max_rel_err <= self.bound else ">"
        return (
            f"verify {self.format} {self.precision} vs PyTorch fp32 at {shapes}: max abs err {self.max_abs_err:.2e}, "
            f"max rel err {self.max_rel_err:.2e} {op} {self.bound:.0e}: {verdict}"
        )


def verify_shapes(
    image_size: tuple[int, int],
    batch_size: int = 1,
    dynamic_batch: bool = False,
    dynamic_size: bool = False,
    size_divisor: int = 1,
) -> list[tuple[int, int, int]]:
    """(B, H, W) to check: the export shape; with a dynamic batch, batch 3 (or 1); with a dynamic size,
    the next odd size (divisor 1: exercises LowFormer's crop) or the next multiple of the divisor."""
    h, w = image_size
    shapes = [(batch_size, h, w)]
    other_batch = batch_size
    if dynamic_batch:
        other_batch = 3 if batch_size != 3 else 1
        shapes.append((other_batch, h, w))
    if dynamic_size:
        if size_divisor == 1:
            shapes.append((other_batch, h + 1 + h % 2, w + 1 + w % 2))
        else:
            shapes.append((other_batch, h + size_divisor, w + 2 * size_divisor))
    return shapes


def verify(
    model: nn.Module,
    path: str | os.PathLike,
    format: str = "onnx",
    image_size: tuple[int, int] = (224, 224),
    dynamic_batch: bool = False,
    dynamic_size: bool = False,
    fp16: bool = False,
    *,
    batch_size: int = 1,
    shapes: Sequence[tuple[int, int, int]] | None = None,
    bound: float | None = None,
    seed: int = 0,
) -> VerifyReport:
    """Run the exported file and `model` (fp32, eval mode) on the same random inputs and compare.

    The shapes tried are `verify_shapes(image_size, batch_size, dynamic_batch, dynamic_size,
    model's size_divisor)` unless `shapes` ((B, H, W) each) is given. The bound on the relative
    error max|exported - torch| / max|torch| is 1e-4 for fp32 and 1e-2 for fp16 unless `bound` is
    given. ONNX runs on ONNX Runtime's CPUExecutionProvider; TorchScript on the model's device.

    NOTE: ONNX Runtime's CPU provider computes most fp16 operators in fp32 and drops the fp16
    round trips between them, which would hide an overflow that a GPU shows. So in an fp16 graph
    every fp16 tensor is also fetched, and one holding inf or nan fails the check.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose from {', '.join(FORMATS)}")
    model.eval()
    if shapes is None:
        shapes = verify_shapes(image_size, batch_size, dynamic_batch, dynamic_size, size_divisor_of(model))
    run = _onnx_runner(path) if format == "onnx" else _torchscript_runner(path, _device_of(model))
    report = VerifyReport(format, "fp16" if fp16 else "fp32", bound if bound is not None else _bound(fp16))
    for k, shape in enumerate(shapes):
        x = random_input(model, shape, seed=seed + k)
        with torch.no_grad():
            expected = [t.float().cpu() for t in _as_list(model(x))]
        got, overflowed = run(x)
        if len(got) != len(expected):
            raise ValueError(f"{path} gives {len(got)} outputs, the model {len(expected)}")
        abs_err, rel_err, finite = 0.0, 0.0, True
        for a, b in zip(expected, got):
            if a.shape != b.shape:
                raise ValueError(
                    f"{path} gives an output of shape {tuple(b.shape)} at input {shape}, the model {tuple(a.shape)}"
                )
            finite = finite and bool(torch.isfinite(b).all())
            diff = float((a - b).abs().nan_to_num(nan=math.inf, posinf=math.inf).max())  # nan: infinitely wrong
            abs_err = max(abs_err, diff)
            rel_err = max(rel_err, diff / max(float(a.abs().max()), torch.finfo(torch.float32).tiny))
        report.checks.append(ShapeCheck(tuple(x.shape), abs_err, rel_err, finite and not overflowed, overflowed))
    _logger.info("%s", report.summary())
    return report


def _bound(fp16: bool) -> float:
    return FP16_BOUND if fp16 else FP32_BOUND


_Runner = Callable[[torch.Tensor], tuple[list[torch.Tensor], list[str]]]


def _onnx_runner(path) -> _Runner:
    """Runs the graph; returns its outputs and the names of fp16 tensors inside it that overflowed."""
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


def _torchscript_runner(path, device: torch.device) -> _Runner:
    # map_location also moves a frozen module's constants, which .to() would not
    with _logged_warnings("torchscript"):
        module = torch.jit.load(str(path), map_location=device)

    def run(x: torch.Tensor) -> tuple[list[torch.Tensor], list[str]]:
        with torch.no_grad():
            return [t.float().cpu() for t in _as_list(module(x))], []

    return run

"""fp16 ONNX: rewrite an fp32 graph so it computes in float16 where that is safe.

Weights and activations become float16, except the operators that overflow or lose too much
precision in half precision, which keep computing in float32 (`KEEP_FP32_OPS`: softmax, the
normalisations, reductions, powers; plus the attention logits, i.e. the QK^T MatMul and its scaling
feeding each Softmax, because QK^T is what overflows first, EfficientViT #116/#142). Casts are
inserted where the two regions meet; the graph's inputs and outputs stay float32, so an fp16 file
is a drop-in replacement for the fp32 one. Method and limits: docs/export.md.
"""

from __future__ import annotations

import logging

_logger = logging.getLogger(__name__)

MIN_FP16_OPSET = 17  # LayerNormalization is one operator from opset 17; below, it is decomposed
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
            elif name in initializers:  # an integer constant (the dynamo exporter's shapes, axes)
                new_inits.setdefault(name, initializers[name])
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

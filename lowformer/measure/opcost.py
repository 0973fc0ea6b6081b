"""What each operator of a forward pass costs in work and memory traffic: FLOPs and bytes moved per
*top-level* ATen call, the unit `torch.profiler` times (`lowformer.measure.profiler.top_level_ops`).

The walk is the MAC counter's (`macs.py`): a dispatch mode that sees every ATen call the model really
makes. Under the profiler, each of those calls is tagged, so that it can be attributed to the
top-level call it runs inside (`aten::linear` runs `t` and `addmm`; `aten::batch_norm` runs
`native_batch_norm`); the costs of one top-level call are the sum over what it runs.

Conventions (stated with every result, `COST_CONVENTION`):

- **FLOPs**: 2 per MAC for convolutions, linear layers and matrix products (attention included);
  one per element of the largest tensor read or written for every other arithmetic operator (norms,
  activations, elementwise, pooling, softmax); none for operators that only view, allocate or move
  data.
- **Bytes**: compulsory traffic. A top-level call reads each of its inputs and weights once and
  writes each of its outputs once; nothing is assumed to stay in a cache between calls, and nothing
  a call computes and uses internally (the scaled query of an unfused attention, a composite's
  intermediates) counts. Views move nothing; copies (`contiguous`, `cat`, `pad`, ...) read and
  write. Weights are the tensors that belong to the model's parameters and buffers (and views of
  them).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .macs import VIEW_OPS as MAC_VIEW_OPS
from .macs import forward_hooks, leaf_macs, linear_scope

LEAF_TAG = "lowformer.op#"  # profiler range of one ATen call seen by the walk
MODULE_TAG = "lowformer.module#"  # profiler range of one module's forward

COST_CONVENTION = (
    "FLOPs: 2 per MAC (convs, linears, matmuls, attention), 1 per element of the largest tensor for other "
    "arithmetic, 0 for views and copies; bytes: compulsory traffic per top-level call (inputs and weights read "
    "once, outputs written once, no reuse through caches between calls, intermediates inside a call not counted)"
)

# ATen calls that create a view of their input: no traffic (the MAC counter's views and a few more)
VIEW_OPS = MAC_VIEW_OPS | {
    "unfold",
    "view_as_real",
    "view_as_complex",
    "narrow",
    "diagonal",
    "expand_as",
    "view_as",
}
# ATen calls that allocate without writing, or only ask about shapes
ALLOC_OPS = {
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "sym_size",
    "sym_stride",
    "sym_numel",
    "sym_storage_offset",
    "is_same_size",
    "_local_scalar_dense",
}
# ATen calls that move data without arithmetic: read + write, no FLOPs
COPY_OPS = {
    "clone",
    "contiguous",
    "_to_copy",
    "copy_",
    "cat",
    "stack",
    "constant_pad_nd",
    "pad",
    "reflection_pad2d",
    "replication_pad2d",
    "index",
    "index_select",
    "gather",
    "flip",
    "roll",
    "repeat",
    "pixel_shuffle",
    "pixel_unshuffle",
    "channel_shuffle",
    "im2col",
    "col2im",
    "zeros",
    "zeros_like",
    "ones",
    "ones_like",
    "full",
    "full_like",
    "new_zeros",
    "new_ones",
    "new_full",
    "fill_",
    "zero_",
    "arange",
    "scalar_tensor",
}


@dataclass
class OpCost:
    """One top-level ATen call of a forward pass and what it costs (whole batch)."""

    index: int  # position among the top-level calls of the pass
    name: str  # "aten::conv2d"
    input_shapes: list  # as the profiler records them (dense vs depthwise is decided from them)
    transposed: bool | None  # the `transposed` argument of aten::convolution, when recorded
    module: str  # path of the innermost module running when the call started ("" = the model itself)
    macs: dict[str, int] = field(default_factory=dict)  # by the MAC counter's kinds
    flops: int = 0
    bytes_read: int = 0  # activations read
    bytes_weights: int = 0  # parameters and buffers read
    bytes_written: int = 0
    leaf_ops: list[str] = field(default_factory=list)  # the ATen calls it ran, as the dispatch mode saw them
    # per tensor storage read (activations and weights): [bytes, reuse distance], the bytes all calls moved
    # since the last call that touched that storage (the previous pass's, for its first use: the model
    # runs again and again when it is timed); see `reuse_distances`
    reads_reuse: list[list[int]] = field(default_factory=list)
    layout: str = ""  # of its first input, when that is an image (`image_layout`): "nchw", "channels_last", "strided"
    # the stride of its first input's last dimension (`inner_stride`): 1 when each row is contiguous, as the
    # fused attention kernels need (PyTorch runs SDPA on other inputs as matmuls and a softmax)
    inner_stride: int = 1

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_weights + self.bytes_written

    @property
    def intensity(self) -> float | None:
        """FLOPs per byte moved; None when nothing moves."""
        return self.flops / self.bytes if self.bytes else None

    def to_dict(self) -> dict:
        return {**asdict(self), "bytes": self.bytes, "intensity": self.intensity}


@dataclass
class _Leaf:
    """One ATen call seen by the dispatch mode."""

    name: str
    macs: tuple[str, int] | None
    flops: int
    reads: list[tuple[int, int, int, bool]]  # (storage, first byte, end byte, is weight)
    writes: list[tuple[int, int]]  # (storage, bytes)
    layout: str = ""  # of its first input (`image_layout`)
    inner_stride: int = 1  # of its first input (`inner_stride`)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    """The bytes of its storage a view spans: from its first element to past its last (a transposed
    view spans what its source does; an expanded one, only what it repeats)."""
    if t.numel() == 0:
        return 0, 0
    span = 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))
    first = t.storage_offset() * t.element_size()
    return first, first + span * t.element_size()


def _strides_like_channels_last(sizes: Sequence[int], strides: Sequence[int]) -> bool:
    """PyTorch's test of whether a 4-D tensor's strides order its memory as N, H, W, C
    (c10's `is_channels_last_strides_2d`): from C to W to H to N, each stride at least what the
    dimensions before it span (one of size 1 spans nothing more); a batch whose stride is as small as
    C's (N x 1 x 1 x 1, ambiguous) counts as NCHW."""
    if strides[1] == 0:
        return False
    least = 0
    for d in (1, 3, 2, 0):
        if sizes[d] == 0 or strides[d] < least or (d == 0 and least == strides[1]):
            return False
        least = strides[d] * sizes[d] if sizes[d] > 1 else strides[d]
    return True


def image_layout(t: torch.Tensor) -> str:
    """How a 4-D tensor is laid out for the operators that read images (convolutions pick their kernel
    by it, as `Tensor.suggest_memory_format` says): "channels_last" when its strides order its memory as
    N, H, W, C; "nchw" when it is contiguous; else "strided", which a convolution first copies to NCHW
    (a token sequence (1, H*W, C) viewed as a 1 x C x H x W image is one: its batch stride is C, so it
    is not channels-last-like, though `is_contiguous(memory_format=torch.channels_last)` says it is
    channels-last; at batch 2 and more the same view is channels-last). "" for other tensors."""
    if t.dim() != 4:
        return ""
    if _strides_like_channels_last(t.shape, t.stride()):
        return "channels_last"
    return "nchw" if t.is_contiguous() else "strided"


def inner_stride(t: torch.Tensor) -> int:
    """The stride of a tensor's last dimension: 1 when its rows are contiguous (and for a last dimension of
    size 1, or none, whose stride nothing reads). A query of attention with another (the head dimension
    of a transposed (B, heads, head_dim, tokens) tensor) makes PyTorch's SDPA refuse its fused CPU
    kernel and run matmuls and a softmax instead."""
    return t.stride(-1) if t.dim() and t.shape[-1] > 1 else 1


def _tensors(obj) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    """`Tensor.suggest_memory_format`: channels-last for what `image_layout` calls channels-last."""
    return torch.channels_last if image_layout(t) == "channels_last" else torch.contiguous_format


def _conv_layout(args: tuple, out):
    """A convolution's output is channels-last on the CPU when its input or weight is (oneDNN's rule); the
    meta kernel returns NCHW for a channels-last input at any batch size."""
    x, weight = args[0], args[1]
    if out.dim() == 4 and torch.channels_last in (_memory_format(x), _memory_format(weight)):
        return out.contiguous(memory_format=torch.channels_last)
    return out


def _group_norm_layout(args: tuple, out):
    """Group norm's output has its input's memory format on CPU; the meta kernel's is always NCHW."""
    return (out[0].contiguous(memory_format=_memory_format(args[0])), *out[1:])


def _layer_norm_layout(args: tuple, out):
    """Layer norm's output is contiguous on CPU; the meta kernel keeps the strides of an input that is dense
    but for the stride of a dimension of size 1 (a batch of 1 viewed so: EdgeNeXt's tokens), a stride no
    layout rule reads, corrected so that the walk's strides are the CPU's."""
    return (out[0].contiguous(), *out[1:])


# the ATen calls whose meta kernels lay out their output unlike the eager CPU kernels that the latency model's
# sweep timed (every other call of the 48 models of `analyze models --set isomacs24` and `isomacs24-large`,
# batch 1 and 16, matches: benchmarks/meta_layouts.py): their meta output is copied (free on the meta device)
# to the eager layout, so that the calls after them see the layout (`image_layout`) they see when the model runs
_EAGER_LAYOUT = {
    "convolution": _conv_layout,
    "native_group_norm": _group_norm_layout,
    "native_layer_norm": _layer_norm_layout,
}


class _CostWalk(TorchDispatchMode):
    """Records every ATen call with its MACs, FLOPs, the tensors it reads and writes, and the module it
    runs in; tags each call for the profiler (`lowformer.op#N`) so that it can be grouped under its
    top-level call."""

    def __init__(self, weights: set[int], tag: bool = True) -> None:
        super().__init__()
        self.weights = weights  # storages of parameters and buffers
        self.tag = tag  # mark each call for the profiler
        self.leaves: list[_Leaf] = []
        self.linear_depth = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "profiler":  # the module ranges' own markers
            return func(*args, **kwargs)
        if self.tag:
            with torch.profiler.record_function(f"{LEAF_TAG}{len(self.leaves)}"):
                out = func(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in _EAGER_LAYOUT and next(_tensors(out)).device.type == "meta":
            out = _EAGER_LAYOUT[name](args, out)
        self.leaves.append(self._leaf(name, args, kwargs, out))
        return out

    def _leaf(self, name: str, args: tuple, kwargs: dict, out) -> _Leaf:
        if name in VIEW_OPS or name in ALLOC_OPS:
            return _Leaf(name, None, 0, [], [])
        inputs = [t for t in _tensors(list(args) + list(kwargs.values()))]
        outputs = list(_tensors(out))
        if name == "copy_":  # copy_(dst, src): reads src, writes dst
            inputs = inputs[1:2]
        elif name in ("fill_", "zero_"):
            inputs = []
        elif name.endswith("_"):  # in place: reads and writes its first argument
            outputs = inputs[:1]
        if "out" in kwargs:  # an out= variant writes its out argument, it does not read it
            outs = list(_tensors(kwargs["out"]))
            inputs = [t for t in inputs if not any(t is o for o in outs)]
            outputs = outs
        macs = leaf_macs(name, args, out, self.linear_depth > 0)
        if macs is not None:
            flops = 2 * macs[1]
        elif name in COPY_OPS:
            flops = 0
        else:
            flops = max((t.numel() for t in inputs + outputs), default=0)
        reads = [(_storage(t), *_byte_range(t), _storage(t) in self.weights) for t in inputs]
        writes = [(_storage(t), _nbytes(t)) for t in outputs]
        first = inputs[0] if inputs else None
        layout, inner = (image_layout(first), inner_stride(first)) if first is not None else ("", 1)
        return _Leaf(name, macs, flops, reads, writes, layout, inner)


@contextmanager
def _module_ranges(model: nn.Module) -> Iterator[None]:
    """Mark each module's forward as a profiler range (`lowformer.module#PATH`), so that every top-level
    call can be attributed to the innermost module it ran in, calls without ATen work included."""
    open_ranges: list = []
    paths = {m: path for path, m in model.named_modules()}

    def enter(module, inputs):
        rf = torch.profiler.record_function(f"{MODULE_TAG}{paths[module]}")
        rf.__enter__()
        open_ranges.append(rf)

    def leave(module, inputs, output):
        open_ranges.pop().__exit__(None, None, None)

    with forward_hooks(paths, enter, leave):
        yield


@torch.no_grad()
def op_costs(model: nn.Module, x: torch.Tensor) -> list[OpCost]:
    """FLOPs and bytes of every top-level ATen call of `model(x)`, in call order (see the module's docstring).

    `model` and `x` may live on the meta device (shapes only, instant) or a real one. The model is
    run once before the counted pass, in eval mode (its train/eval state is restored after), so
    that lazily built caches (attention biases) are not counted as part of every call.
    """
    from torch.profiler import ProfilerActivity, profile

    from .profiler import is_top_level, quiet_profiler, transposed_arg

    quiet_profiler()
    with _walk(model, x) as walk:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            with _module_ranges(model), linear_scope(model, walk), walk:
                model(x)
    return _group(prof.events(), walk.leaves, is_top_level, transposed_arg)


@torch.no_grad()
def call_cost(model: nn.Module, x: torch.Tensor) -> OpCost | None:
    """FLOPs and bytes of `model(x)` taken as *one* top-level call: the sum over every ATen call it
    makes, found without the profiler (about a fourth of `op_costs`'s time on one operator; its
    name, input shapes and module are left empty). For a module known to run one top-level call (an
    operator case of the latency model's sweep); `op_costs` tells how many it runs. None when no ATen
    call reaches the walk: then the module either runs no call or one that resolves above the
    dispatcher (eval-mode dropout returns its input), which only `op_costs` tells apart.
    """
    with _walk(model, x, tag=False) as walk:
        with linear_scope(model, walk), walk:
            model(x)
    if not walk.leaves:
        return None
    cost = OpCost(0, "", [], None, "")
    _add_traffic(cost, walk.leaves)
    return cost


@contextmanager
def _walk(model: nn.Module, x: torch.Tensor, tag: bool = True) -> Iterator[_CostWalk]:
    """A cost walk for `model`, after one run of `model(x)` in eval mode (lazily built caches, such as
    attention biases, are then not counted as part of every call); the train/eval state is restored
    after."""
    weights = {_storage(t) for t in list(model.parameters()) + list(model.buffers())}
    was_training = model.training
    model.eval()
    try:
        model(x)
        yield _CostWalk(weights, tag)
    finally:
        model.train(was_training)


def _group(events, leaves: list[_Leaf], is_top_level, transposed_arg) -> list[OpCost]:
    """One `OpCost` per top-level ATen event, summing the leaves tagged inside it; its module is the
    innermost module range around it."""
    tops = [e for e in events if e.name.startswith("aten::") and is_top_level(e)]
    position = {e.id: i for i, e in enumerate(tops)}
    members: list[list[_Leaf]] = [[] for _ in tops]
    for e in events:
        if not e.name.startswith(LEAF_TAG):
            continue
        parent, top = e.cpu_parent, None
        while parent is not None:
            if parent.name.startswith("aten::"):
                top = parent
            parent = parent.cpu_parent
        if top is not None and top.id in position:
            members[position[top.id]].append(leaves[int(e.name[len(LEAF_TAG) :])])
    costs, touched = [], []
    for i, (event, group) in enumerate(zip(tops, members)):
        cost = OpCost(i, event.name, event.input_shapes, transposed_arg(event), _module_of(event))
        touched.append(_add_traffic(cost, group))
        costs.append(cost)
    reuse_distances(costs, touched)
    return costs


def _module_of(event) -> str:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(MODULE_TAG):
            return parent.name[len(MODULE_TAG) :]
        parent = parent.cpu_parent
    return ""


def _add_traffic(cost: OpCost, group: list[_Leaf]) -> tuple[dict[int, int], set[int]]:
    """FLOPs, MACs and compulsory bytes of one top-level call from the ATen calls it ran; returns the
    storages it read from outside (-> bytes) and those it wrote."""
    produced: dict[int, int] = {}  # storages written inside this call -> bytes
    consumed: set[int] = set()  # ... and read again inside it (intermediates)
    read: dict[int, list[tuple[int, int]]] = {}  # storages read from outside -> byte ranges
    weights: set[int] = set()
    first = next((leaf for leaf in group if leaf.reads), None)
    if first is not None:
        cost.layout, cost.inner_stride = first.layout, first.inner_stride
    for leaf in group:
        cost.leaf_ops.append(leaf.name)
        cost.flops += leaf.flops
        if leaf.macs is not None:
            kind, n = leaf.macs
            cost.macs[kind] = cost.macs.get(kind, 0) + n
        for storage, first, end, is_weight in leaf.reads:
            if storage in produced:
                consumed.add(storage)
                continue
            read.setdefault(storage, []).append((first, end))
            if is_weight:
                weights.add(storage)
        for storage, nbytes in leaf.writes:
            produced[storage] = max(produced.get(storage, 0), nbytes)
    # a storage read through several views (q, k and v of one tensor, a view and its transpose) counts
    # the bytes the views span together, once
    spans = {storage: _union_length(ranges) for storage, ranges in read.items()}
    cost.bytes_read = sum(n for storage, n in spans.items() if storage not in weights)
    cost.bytes_weights = sum(n for storage, n in spans.items() if storage in weights)
    cost.bytes_written = sum(n for s, n in produced.items() if s not in consumed)
    return spans, set(produced)


def reuse_distances(costs: list[OpCost], touched: list[tuple[dict[int, int], set[int]]]) -> None:
    """Fill each call's `reads_reuse` from the storages each call read (-> bytes) and wrote, in call order.

    A read's reuse distance is the traffic (`OpCost.bytes`) of the calls between the last call that
    read or wrote the same storage and this one: a cache of that many bytes would still hold it (an
    upper bound: calls between may move the same bytes twice). A storage's first use in the pass (a
    weight, the input) is reused from the pass before, so its distance wraps around the pass.
    """
    ends = []  # traffic up to the end of each call
    total = 0
    for cost in costs:
        total += cost.bytes
        ends.append(total)
    last = {}  # storage -> traffic at the end of the last call that touched it (this pass)
    for i, (reads, writes) in enumerate(touched):
        for storage in list(reads) + list(writes):
            last[storage] = ends[i]
    seen: dict[int, int] = {}
    for i, (cost, (reads, writes)) in enumerate(zip(costs, touched)):
        start = ends[i] - cost.bytes
        for storage, nbytes in reads.items():
            before = seen.get(storage, last[storage] - total)
            cost.reads_reuse.append([nbytes, start - before])
        for storage in list(reads) + list(writes):
            seen[storage] = ends[i]


def _union_length(ranges: list[tuple[int, int]]) -> int:
    total, reach = 0, None
    for first, end in sorted(ranges):
        if reach is None or first >= reach:
            total += end - first
            reach = end
        elif end > reach:
            total += end - reach
            reach = end
    return total


def total_flops(costs: list[OpCost]) -> int:
    return sum(c.flops for c in costs)


def total_bytes(costs: list[OpCost]) -> int:
    return sum(c.bytes for c in costs)


def count_op_costs(model: nn.Module, input_shape: Sequence[int], device: str = "meta") -> list[OpCost]:
    """`op_costs` of `model` on a zeros input of `input_shape` (batch first) on `device`.

    "meta" (the default) walks a shape-only copy of the model: instant at any batch size, and the
    model itself is not touched. Any other device runs the model where it is.
    """
    return op_costs(*_shaped(model, input_shape, device))


def count_call_cost(model: nn.Module, input_shape: Sequence[int], device: str = "meta") -> OpCost | None:
    """`call_cost` of `model` on a zeros input of `input_shape`, as `count_op_costs` runs it."""
    return call_cost(*_shaped(model, input_shape, device))


def _shaped(model: nn.Module, input_shape: Sequence[int], device: str) -> tuple[nn.Module, torch.Tensor]:
    if str(device) == "meta":
        model = copy.deepcopy(model).to("meta")
    return model, torch.zeros(*input_shape, device=device)

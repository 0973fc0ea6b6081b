"""Count multiply-accumulates (MACs) and parameters of any PyTorch model, on CPU or GPU.

Convention (printed with every number): one fused multiply-add = 1 MAC; convolutions,
transposed convolutions, linear layers and matrix products (attention included) are counted;
bias adds, norms, activations, pooling, softmax and elementwise ops are not, and are listed as
uncounted. The count is taken at the ATen level under a dispatch mode, so it sees what the model
really runs: `F.scaled_dot_product_attention` on CPU (which `torch.utils.flop_counter` misses),
grouped and depthwise convs, and transposed convs (counted from their *input* size: every input
pixel is multiplied into a kernel-sized output patch).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

CONVENTION = "1 MAC = 1 fused multiply-add; convs, transposed convs, linears and matmuls/attention only"

OP_KINDS = ("conv", "depthwise_conv", "transposed_conv", "linear", "attention_matmul")

# ATen ops that return a view of their input: no arithmetic, no traffic
VIEW_OPS = {
    "view",
    "_unsafe_view",
    "reshape",
    "_reshape_alias",
    "permute",
    "transpose",
    "t",
    "expand",
    "slice",
    "select",
    "split",
    "split_with_sizes",
    "chunk",
    "unbind",
    "squeeze",
    "unsqueeze",
    "flatten",
    "alias",
    "detach",
    "as_strided",
    "lift_fresh",
}
# ATen ops that only move or view memory (or allocate): neither counted nor worth listing.
LAYOUT_OPS = VIEW_OPS | {
    "clone",
    "contiguous",
    "_to_copy",
    "copy_",
    "empty",
    "empty_like",
    "zeros",
    "zeros_like",
    "ones_like",
    "full",
    "new_empty",
    "new_zeros",
    "cat",
    "stack",
    "pad",
    "constant_pad_nd",
    "sym_size",
    "sym_stride",
    "sym_numel",
    "sym_storage_offset",
    "is_same_size",
    "index",
}

_SDPA_OPS = {
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable",
}


@dataclass
class MacReport:
    """What `count_macs` found. MACs are for the whole batch given (batch 1 by default)."""

    macs: int
    params: int
    params_head: int
    image_size: tuple[int, int]
    batch_size: int
    by_op: dict[str, int] = field(default_factory=dict)
    uncounted: dict[str, int] = field(default_factory=dict)
    convention: str = CONVENTION

    @property
    def params_backbone(self) -> int:
        return self.params - self.params_head

    def to_dict(self) -> dict:
        return {
            "params": self.params,
            "params_backbone": self.params_backbone,
            "params_head": self.params_head,
            "macs": self.macs,
            "image_size": list(self.image_size),
            "batch_size": self.batch_size,
            "by_op": dict(self.by_op),
            "uncounted": dict(self.uncounted),
            "convention": self.convention,
        }


def leaf_macs(name: str, args: tuple, out, in_linear: bool) -> tuple[str, int] | None:
    """(kind, MACs) of one ATen call as the dispatch mode sees it (`name` without overload), or None
    for an operator that counts no MACs. `in_linear`: the call happens inside an `nn.Linear`."""
    if name in ("convolution", "_convolution", "convolution_overrideable"):
        x, w = args[0], args[1]
        transposed, groups = bool(args[6]), int(args[8])
        kernel = math.prod(w.shape[2:])
        if transposed:
            # weight (C_in, C_out / groups, k...): each input element feeds C_out/groups * k outputs
            return "transposed_conv", x.numel() * w.shape[1] * kernel
        # weight (C_out, C_in / groups, k...): each output element sums C_in/groups * k products
        kind = "depthwise_conv" if groups > 1 and w.shape[1] == 1 else "conv"
        return kind, out.numel() * w.shape[1] * kernel
    if name in ("mm", "addmm", "bmm", "baddbmm"):
        a, b = (args[1], args[2]) if name in ("addmm", "baddbmm") else (args[0], args[1])
        return ("linear" if in_linear else "attention_matmul"), math.prod(a.shape) * b.shape[-1]
    if name in _SDPA_OPS:
        q, k, v = args[0], args[1], args[2]
        batch = math.prod(q.shape[:-2])
        return "attention_matmul", batch * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])
    return None


class _MacCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter[str] = Counter()
        self.uncounted: Counter[str] = Counter()
        self.linear_depth = 0  # > 0 while inside an nn.Linear's forward

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        counted = leaf_macs(name, args, out, self.linear_depth > 0)
        if counted is not None:
            self.by_op[counted[0]] += counted[1]
        elif name not in LAYOUT_OPS:
            self.uncounted[name.lstrip("_")] += 1
        return out


@contextmanager
def forward_hooks(modules: Iterable[nn.Module], enter, leave) -> Iterator[None]:
    """While the block runs, call `enter(module, inputs)` before and `leave(module, inputs, output)`
    after the forward of each of `modules`."""
    handles = []
    for m in modules:
        handles.append(m.register_forward_pre_hook(enter))
        handles.append(m.register_forward_hook(leave))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def linear_scope(model: nn.Module, counter) -> Iterator[None]:
    """Keep `counter.linear_depth` above 0 while an `nn.Linear` of `model` runs, so that its matrix
    product counts as "linear" rather than "attention_matmul"."""

    def enter(module, inputs):
        counter.linear_depth += 1

    def leave(module, inputs, output):
        counter.linear_depth -= 1

    with forward_hooks((m for m in model.modules() if isinstance(m, nn.Linear)), enter, leave):
        yield


def count_params(model: nn.Module, head_prefix: str = "head") -> tuple[int, int]:
    """(all parameters, parameters under `head_prefix`), each shared tensor counted once."""
    total = head = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if name == head_prefix or name.startswith(head_prefix + "."):
            head += p.numel()
    return total, head


@torch.no_grad()
def count_macs(
    model: nn.Module,
    image_size: tuple[int, int] | int = 224,
    batch_size: int = 1,
    in_chans: int = 3,
    device: str | torch.device | None = None,
) -> MacReport:
    """MACs of one forward pass at `image_size` (H, W) and the parameter counts of `model`.

    The model runs once on zeros in eval mode (its train/eval state is restored after).
    """
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    x = torch.zeros(batch_size, in_chans, *image_size, device=device)
    counter = _MacCounter()
    was_training = model.training
    model.eval()
    try:
        with linear_scope(model, counter), counter:
            model(x)
    finally:
        model.train(was_training)
    params, params_head = count_params(model)
    by_op = {k: int(counter.by_op.get(k, 0)) for k in OP_KINDS}
    return MacReport(
        macs=sum(by_op.values()),
        params=params,
        params_head=params_head,
        image_size=tuple(image_size),
        batch_size=batch_size,
        by_op=by_op,
        uncounted=dict(sorted(counter.uncounted.items())),
    )

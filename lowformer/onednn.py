"""oneDNN convolutions with pre-packed weights: the CPU half of deploy mode.

`torch.nn.functional.conv2d` on CPU hands each call to oneDNN with the weight in PyTorch's plain
layout, and oneDNN then runs a kernel for that layout. Reordering the weight once into the blocked
layout oneDNN picks for the convolution (`torch.ops.mkldnn._reorder_convolution_weight`) and
calling `torch.ops.mkldnn._convolution_pointwise` with it gives the same numbers faster, most of
all for 1x1 and strided depthwise convs (docs/performance.md). The same op applies an activation
as a post-op, which saves one pass over the conv's output. Its output is channels_last whatever
the input's layout, so a packed model runs channels_last throughout.

`PackedConv2d` / `PackedConvTranspose2d` subclass the torch layers and keep their parameters, so
state dicts, parameter counts and `isinstance` checks do not change. They take the packed path only
where it is exactly the layer's function: fp32 CPU tensors, no autograd, no autocast, and no
tracing, scripting, compiling or dispatch-mode analysis (the MAC counter); anywhere else they run
the plain op. The packed weight is a cache, rebuilt when the weight changes in place (its version
counter moves, e.g. after `load_state_dict`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

# activations oneDNN applies as a post-op, as (attr, scalars, algorithm); GELU only in its exact form
_POST_OPS: dict[type[nn.Module], tuple[str, list, str]] = {
    nn.Hardswish: ("hardswish", [], ""),
    nn.ReLU: ("relu", [], ""),
    nn.GELU: ("gelu", [], "none"),
}


def available() -> bool:
    """True when this PyTorch build has oneDNN with the pointwise convolution ops."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def post_op(act: nn.Module) -> tuple[str, list, str] | None:
    """The oneDNN post-op that computes `act` exactly, or None."""
    if isinstance(act, nn.GELU) and act.approximate != "none":
        return None
    return _POST_OPS.get(type(act))


def _packed_path_allowed(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.dim() == 4
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not torch.is_autocast_enabled("cpu")
        and not torch.jit.is_scripting()
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
        and _get_current_dispatch_mode() is None
    )


def _adopt(cls: type, layer: nn.Module) -> nn.Module:
    """A `cls` instance sharing `layer`'s parameters, buffers and hyper-parameters (no copy)."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    skip = ("_parameters", "_buffers", "_modules")
    new.__dict__.update({k: v for k, v in layer.__dict__.items() if k not in skip})
    new._parameters = dict(layer._parameters)
    new._buffers = dict(layer._buffers)
    new._modules = dict(layer._modules)
    return new


class _Packed:
    """Mixin holding the packed weights, one per input shape.

    oneDNN picks the packed layout for the input shape it is given: B0 deployed and first run at
    batch 16 ran 1.25x slower at batch 1 than the same model packed for batch 1 (2-core CPU,
    interleaved). So the cache keeps the last `MAX_SHAPES` input shapes, least recently used first
    out, each with the weight version it was packed from.
    """

    MAX_SHAPES = 4
    _packed: OrderedDict | None = None  # input shape -> (weight key, packed weight)

    def _cache_key(self) -> tuple:
        # NOTE: a weight made under `torch.inference_mode` (a model deployed inside it) has no version
        # counter; it is keyed by its storage alone, so an in-place change of it is not seen
        version = None if self.weight.is_inference() else self.weight._version
        return (version, self.weight.data_ptr())

    def _cached(self, x: torch.Tensor, pack: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The weight packed for `x`'s shape: from the cache, or `pack()`ed now (and cached)."""
        if self._packed is None:
            self._packed = OrderedDict()
        shape, key = tuple(x.shape), self._cache_key()
        hit = self._packed.get(shape)
        if hit is not None and hit[0] == key:
            self._packed.move_to_end(shape)
            return hit[1]
        self._packed[shape] = (key, pack())
        self._packed.move_to_end(shape)
        while len(self._packed) > self.MAX_SHAPES:
            self._packed.popitem(last=False)
        return self._packed[shape][1]

    def __getstate__(self) -> dict:  # deepcopy / pickle: the packed weight is an opaque oneDNN tensor
        state = self.__dict__.copy()
        state.pop("_packed", None)
        return state


class PackedConv2d(_Packed, nn.Conv2d):
    """Conv2d (+ optional fused activation) running oneDNN with a pre-packed weight on CPU."""

    def __init__(self, *args, act: nn.Module | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.act = act if act is not None else nn.Identity()

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, act: nn.Module | None = None) -> PackedConv2d:
        """Same weights and hyper-parameters as `conv`, optionally with `act` fused after it."""
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"only zero-padded convs with explicit padding can be packed, got {conv}")
        if act is not None and post_op(act) is None:
            raise ValueError(f"{act} has no exact oneDNN post-op")
        new = _adopt(cls, conv)
        new.act = (act if act is not None else nn.Identity()).train(conv.training)
        return new

    def _packed_weight(self, x: torch.Tensor) -> torch.Tensor:
        return self._cached(
            x,
            lambda: torch.ops.mkldnn._reorder_convolution_weight(
                self.weight.detach(), list(self.padding), list(self.stride), list(self.dilation), self.groups, x.shape
            ),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _packed_path_allowed(x, self.weight):
            return self.act(F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups))
        attr, scalars, algorithm = post_op(self.act) or ("none", [], "")
        bias = self.bias.detach() if self.bias is not None else None
        return torch.ops.mkldnn._convolution_pointwise(
            x,
            self._packed_weight(x),
            bias,
            list(self.padding),
            list(self.stride),
            list(self.dilation),
            self.groups,
            attr,
            scalars,
            algorithm,
        )


class PackedConvTranspose2d(_Packed, nn.ConvTranspose2d):
    """ConvTranspose2d running oneDNN with a pre-packed weight on CPU (forward without output_size)."""

    @classmethod
    def from_conv(cls, conv: nn.ConvTranspose2d) -> PackedConvTranspose2d:
        if conv.padding_mode != "zeros":
            raise ValueError(f"only zero-padded transposed convs can be packed, got {conv}")
        new = _adopt(cls, conv)
        return new

    def _packed_weight(self, x: torch.Tensor) -> torch.Tensor:
        return self._cached(
            x,
            lambda: torch.ops.mkldnn._reorder_convolution_transpose_weight(
                self.weight.detach(),
                list(self.padding),
                list(self.output_padding),
                list(self.stride),
                list(self.dilation),
                self.groups,
                x.shape,
            ),
        )

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if output_size is not None or not _packed_path_allowed(x, self.weight):
            return super().forward(x, output_size)
        bias = self.bias.detach() if self.bias is not None else None
        return torch.ops.mkldnn._convolution_transpose_pointwise(
            x,
            self._packed_weight(x),
            bias,
            list(self.padding),
            list(self.output_padding),
            list(self.stride),
            list(self.dilation),
            self.groups,
            "none",
            [],
            "",
        )


def pack_convs(model: nn.Module, fuse_activations: bool = True) -> int:
    """Replace every plain Conv2d / ConvTranspose2d in `model` by its packed form, in place.

    With `fuse_activations`, an activation becomes the conv's oneDNN post-op where a block says it
    may: a block that applies an activation right to a conv's output lists the pair in its
    `conv_act_pairs()` hook (ours: a folded conv-norm-act, the LowFormer MLP's first 1x1 conv and
    its GELU). Blocks without the hook are packed without fusion, since only a block's own forward
    knows what happens between its layers. Returns the number of layers replaced; already packed
    layers are left alone.
    """
    count = 0
    for module in model.modules():
        if fuse_activations and hasattr(module, "conv_act_pairs"):
            for conv_name, act_name in module.conv_act_pairs():
                count += _fuse(module, conv_name, act_name)
        for name, child in module.named_children():
            if type(child) is nn.Conv2d and child.padding_mode == "zeros" and not isinstance(child.padding, str):
                setattr(module, name, PackedConv2d.from_conv(child))
                count += 1
            elif type(child) is nn.ConvTranspose2d and child.padding_mode == "zeros":
                setattr(module, name, PackedConvTranspose2d.from_conv(child))
                count += 1
    return count


def _fuse(module: nn.Module, conv_name: str, act_name: str) -> int:
    conv, act = getattr(module, conv_name), getattr(module, act_name)
    if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return 0
    if post_op(act) is None:
        return 0
    setattr(module, conv_name, PackedConv2d.from_conv(conv, act=act))
    setattr(module, act_name, nn.Identity().train(act.training))
    return 1


PACKED_LAYERS = (PackedConv2d, PackedConvTranspose2d)

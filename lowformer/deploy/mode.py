"""Deploy mode: an inference-optimised copy of a model that computes the same function.

Every BatchNorm is folded into the conv before it (or, in EdgeViT, into the 1x1 conv after it),
GroupNorm/LayerNorm affines are folded into the following 1x1 conv or linear layer where that is
exact, and dropout / drop-path are removed. The folding lives in the blocks' `fuse()` /
`reparameterize()` methods, so `timm.utils.reparameterize_model` finds them too, also inside
feature extractors and downstream wrappers.

Deploy mode also picks the layout the convolutions run in ("memory_format"):

- "packed": on CPU, convs become oneDNN layers with weights reordered once into oneDNN's blocked
  layout and activations fused as post-ops (`lowformer.onednn`); they produce channels_last
  tensors.
- "channels_last" / "contiguous": plain torch convs with weights in that memory format. A conv
  whose weight is channels_last runs in channels_last whatever the input's layout (oneDNN on CPU
  and cuDNN on CUDA both follow the weight), so the caller's tensors need no change.

"auto" takes what measured fastest for these models on the model's device (docs/performance.md):
packed on CPU, channels_last on CUDA. "tune" times the layouts on this machine and keeps the
fastest (`lowformer.tune` also tries the compilers).
"""

from __future__ import annotations

import copy
import functools

import torch
from timm.layers import DropPath
from timm.models._manipulate import reparameterize_model
from torch import nn

from .. import onednn
from ..measure.timing import Candidate, PerfCounterTimer, Rounds, TimingPolicy, interleave

MEMORY_FORMATS = ("auto", "tune", "packed", "channels_last", "contiguous", "keep")


def check_deployable(model: nn.Module) -> None:
    """Raise ValueError if `model` is in training mode or has parts that cannot be folded."""
    training = [name or "<model>" for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(
            f"deploy needs an eval-mode model, but {training[0]} is in training mode "
            f"({len(training)} modules in all): call model.eval() first, since BatchNorm is folded "
            "with its running statistics"
        )
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None:
            raise ValueError(
                f"{name} is a BatchNorm without running statistics (track_running_stats=False): it "
                "normalises with batch statistics even in eval mode and cannot be folded"
            )


def deploy(
    model: nn.Module,
    inplace: bool = False,
    memory_format: str = "auto",
    example_input: torch.Tensor | None = None,
) -> nn.Module:
    """Inference-optimised model with the same outputs (relative error ~1e-6 in fp32).

    memory_format: the layout the convs run in. "auto": the fastest measured for the model's
    device ("packed" on CPU with oneDNN, "channels_last" on CUDA, otherwise unchanged); "packed":
    pre-packed oneDNN convs with fused activations (CPU); "channels_last" / "contiguous": plain
    convs with weights in that format; "keep": leave the weights as they are (export uses this:
    tracing needs the plain ops); "tune": time the candidates on `example_input` (default a batch
    of 16 at 224x224) on this machine and keep the fastest.

    Idempotent; works on classifiers, `features_only` extractors and wrappers holding them.
    Raises ValueError for a model in training mode or an unknown or unavailable layout.
    """
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"memory_format must be one of {', '.join(MEMORY_FORMATS)}, got {memory_format!r}")
    check_deployable(model)
    if not inplace:
        model = copy.deepcopy(model)
    reparameterize_model(model, inplace=True)
    _strip(model)
    if memory_format == "tune":
        memory_format = tune_layout(model, example_input)
    elif memory_format == "auto":
        memory_format = auto_layout(_device_type(model))
    apply_layout(model, memory_format)
    return model


def auto_layout(device_type: str) -> str:
    """The layout deploy mode picks for a device type when asked for "auto"."""
    if device_type == "cpu":
        return "packed" if onednn.available() else "channels_last"
    if device_type == "cuda":
        return "channels_last"  # what cuDNN's tensor-core kernels want
    return "keep"


def layouts(device_type: str) -> list[str]:
    """The layouts worth trying on a device type (what "tune" times)."""
    packed = ["packed"] if device_type == "cpu" and onednn.available() else []
    return packed + ["channels_last", "contiguous"]


def apply_layout(model: nn.Module, layout: str) -> nn.Module:
    """Put an already folded model's convs into `layout` (see `deploy`), in place."""
    if layout == "packed":
        if _device_type(model) != "cpu" or not onednn.available():
            raise ValueError(
                f"the packed layout needs a CPU model and a PyTorch with oneDNN (model on "
                f"{_device_type(model)}, oneDNN available: {onednn.available()}); use channels_last"
            )
        onednn.pack_convs(model)
        model.to(memory_format=torch.channels_last)  # any layer left plain follows the packed ones
    elif layout in ("channels_last", "contiguous"):
        if any(isinstance(m, onednn.PACKED_LAYERS) for m in model.modules()):
            raise ValueError(f"this model's convs are already packed for oneDNN and cannot be made {layout}")
        model.to(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    elif layout != "keep":
        raise ValueError(f"unknown layout {layout!r}; expected packed, channels_last, contiguous or keep")
    return model


def _device_type(model: nn.Module) -> str:
    p = next(model.parameters(), None)
    return p.device.type if p is not None else "cpu"


def tune_layout(model: nn.Module, example_input: torch.Tensor | None = None, rounds: int = 5) -> str:
    """Time a folded `model` in each candidate layout on `example_input` (default a batch of 16 at
    224x224), interleaved round by round after one untimed call each, and return the layout with the
    lowest median time. Every layout computes the same function (tests/test_deploy.py); `model` is
    unchanged: the candidates are copies. (`lowformer.tune` also tries the compilers, and verifies.)"""
    device = next(model.parameters()).device
    x = (example_input if example_input is not None else torch.randn(16, 3, 224, 224)).to(device)
    # the host clock around a call that ends synchronised: right for any device the model is on
    timer = PerfCounterTimer(sync=functools.partial(torch.cuda.synchronize, device) if device.type == "cuda" else None)
    candidates = [
        Candidate(name, functools.partial(apply_layout(copy.deepcopy(model), name), x), timer)
        for name in layouts(device.type)
    ]
    one_call = TimingPolicy(warmup_iters=0, warmup_s=0.0, min_iters=1, min_s=0.0)
    with torch.no_grad():
        times = interleave(candidates, Rounds(rounds, burst=one_call, warmup=one_call))
    return min(times, key=lambda t: t.median_s).label


def _strip(module: nn.Module) -> None:
    """Replace dropout and drop-path (no-ops in eval mode) by Identity, saving their calls."""
    for name, child in module.named_children():
        if isinstance(child, (nn.Dropout, DropPath)):
            setattr(module, name, nn.Identity().train(child.training))
        else:
            _strip(child)

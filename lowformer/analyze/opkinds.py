"""The operator kinds of the latency model: finer than the profile's kinds where operators of one
profile kind behave differently on the same hardware (a 1x1 conv is a matrix product, a 3x3 conv is
not; GELU's transcendental math costs more than ReLU's compare; a view moves nothing).

`fit_kind` names the kind of one top-level ATen call from the profile's classification
(`classify_op`, the kinds `KINDS` an operator profile reports) and the call's own name and shapes; every operator of a
model gets one, and every operator case of the micro-sweep (`lowformer.analyze.latency`) is one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..measure.macs import LAYOUT_OPS

if TYPE_CHECKING:
    from ..measure.opcost import OpCost

KINDS: dict[str, str] = {
    "dense_conv": "dense conv",
    "depthwise_conv": "depthwise conv",
    "transposed_conv": "transposed conv",
    "linear": "linear",
    "attention": "attention",
    "norm": "norm",
    "activation": "activation",
    "reshape_copy": "reshape/copy",
    "other": "other",
}

# count_macs kinds -> profile kinds
MAC_KINDS = {
    "conv": "dense_conv",
    "depthwise_conv": "depthwise_conv",
    "transposed_conv": "transposed_conv",
    "linear": "linear",
    "attention_matmul": "attention",
}

_CONV_OPS = {
    "conv1d",
    "conv2d",
    "conv3d",
    "convolution",
    "_convolution",
    "_convolution_mode",
    "mkldnn_convolution",
    "cudnn_convolution",
    "thnn_conv2d",
    "_slow_conv2d_forward",
    "_conv_depthwise2d",
    "conv_depthwise3d",
}
_TRANSPOSED_OPS = {
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "cudnn_convolution_transpose",
    "slow_conv_transpose2d",
}
_LINEAR_OPS = {"linear", "addmm", "_addmm_activation"}
_ATTENTION_OPS = {
    "scaled_dot_product_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "matmul",
    "bmm",
    "baddbmm",
    "mm",
    "einsum",
    "softmax",
    "_softmax",
    "_safe_softmax",
}
_NORM_OPS = {
    "batch_norm",
    "_batch_norm_impl_index",
    "native_batch_norm",
    "_native_batch_norm_legit_no_training",
    "cudnn_batch_norm",
    "group_norm",
    "native_group_norm",
    "layer_norm",
    "native_layer_norm",
    "instance_norm",
    "rms_norm",
    "_fused_rms_norm",
}
_ACTIVATION_OPS = {
    "relu",
    "relu_",
    "relu6",
    "hardtanh",
    "hardtanh_",
    "hardswish",
    "hardswish_",
    "hardsigmoid",
    "hardsigmoid_",
    "gelu",
    "gelu_",
    "silu",
    "silu_",
    "sigmoid",
    "sigmoid_",
    "tanh",
    "tanh_",
    "mish",
    "mish_",
    "elu",
    "elu_",
    "leaky_relu",
    "leaky_relu_",
    "prelu",
    "_prelu_kernel",
    "softplus",
}
# the MAC counter's view/copy ops, plus the profiler-visible ops that only move data
_RESHAPE_OPS = LAYOUT_OPS | {
    "channel_shuffle",
    "col2im",
    "empty_strided",
    "flip",
    "gather",
    "im2col",
    "narrow",
    "pixel_shuffle",
    "pixel_unshuffle",
    "repeat",
    "roll",
    "to",
    "unfold",
    "reshape_as",
    "view_as",
    "expand_as",
}


def classify_op(name: str, input_shapes: Sequence | None = None, transposed: bool | None = None) -> str:
    """The kind of one top-level ATen operator (`name` with or without the `aten::` prefix).

    `input_shapes` (as the profiler records them) decide dense vs depthwise for convolutions;
    `transposed` is the `transposed` argument of `aten::convolution` when it was recorded.
    """
    op = name.split("::", 1)[-1].split(".", 1)[0]
    if op in _TRANSPOSED_OPS or (op in _CONV_OPS and transposed):
        return "transposed_conv"
    if op in _CONV_OPS:
        shapes = list(input_shapes or [])
        if len(shapes) >= 2 and len(shapes[0]) >= 2 and len(shapes[1]) >= 2:
            x, w = shapes[0], shapes[1]
            if w[1] == 1 and x[1] > 1:
                return "depthwise_conv"
        return "dense_conv"
    if op in _LINEAR_OPS:
        return "linear"
    if op in _ATTENTION_OPS:
        return "attention"
    if op in _NORM_OPS:
        return "norm"
    if op in _ACTIVATION_OPS:
        return "activation"
    if op in _RESHAPE_OPS:
        return "reshape_copy"
    return "other"


FIT_KINDS: dict[str, str] = {
    "conv_1x1": "1x1 conv",
    "conv_1x1_channels_last": "1x1 conv, channels-last input",
    "conv_kxk": "kxk conv",
    "conv_kxk_channels_last": "kxk conv, channels-last input",
    "depthwise_conv": "3x3 depthwise conv",
    "depthwise_conv_channels_last": "3x3 depthwise conv, channels-last input",
    "depthwise_conv_strided": "3x3 depthwise conv, strided input",
    "depthwise_conv_large": "5x5+ depthwise conv",
    "depthwise_conv_1x1": "1x1 depthwise conv",
    "depthwise_multiplier": "depthwise conv, C_out > C_in",
    "grouped_conv": "grouped conv",
    "transposed_conv": "transposed conv",
    "linear": "linear",
    "matmul": "matmul",
    "sdpa": "SDPA",
    "sdpa_strided": "SDPA, strided head dimension",
    "softmax": "softmax",
    "batch_norm": "batch norm",
    "group_norm": "group norm",
    "layer_norm": "layer norm",
    "activation": "activation (cheap)",
    "activation_exp": "activation (transcendental)",
    "elementwise": "elementwise",
    "pool": "window pool",
    "pool_channels_last": "window pool, channels-last input",
    "reduce": "reduce (mean, sum)",
    "resample": "resample",
    "concat": "concat",
    "copy": "copy (strided)",
    "view": "view/no-op",
}

# kinds split off another in a later sweep version -> the kind whose factors a file without them uses
FALLBACK_KINDS: dict[str, str] = {
    "conv_1x1_channels_last": "conv_1x1",
    "conv_kxk_channels_last": "conv_kxk",
    "pool_channels_last": "pool",
    "depthwise_conv_channels_last": "depthwise_conv",
    "depthwise_conv_strided": "depthwise_conv",
    "sdpa_strided": "sdpa",
}

_TRANSCENDENTAL = {"gelu", "silu", "sigmoid", "tanh", "mish", "softplus", "elu", "erf", "exp", "log", "sin", "cos"}
_SDPA = {
    "scaled_dot_product_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
}
_SOFTMAX = {"softmax", "_softmax", "_safe_softmax", "log_softmax", "_log_softmax"}
_BATCH_NORM = {
    "batch_norm",
    "_batch_norm_impl_index",
    "native_batch_norm",
    "_native_batch_norm_legit_no_training",
    "cudnn_batch_norm",
}
_POOL = {"avg_pool2d", "max_pool2d", "max_pool2d_with_indices", "avg_pool1d", "max_pool1d"}
_REDUCE = {
    "mean",
    "sum",
    "amax",
    "max",
    "adaptive_avg_pool2d",
    "adaptive_max_pool2d",
    "linalg_vector_norm",
    "norm",
    "std",
    "var",
    "var_mean",
    "cumsum",
}
_RESAMPLE = {"upsample_bilinear2d", "upsample_nearest2d", "upsample_bicubic2d", "interpolate", "grid_sampler"}
# calls that are no-ops in an eval-mode forward pass, or views under another name
_NO_OP = {"dropout", "dropout_", "feature_dropout", "alpha_dropout", "identity", "expand_as", "reshape_as", "view_as"}


def fit_kind(
    name: str,
    input_shapes: Sequence | None = None,
    transposed: bool | None = None,
    nbytes: int = 0,
    layout: str = "",
    inner_stride: int = 1,
) -> str:
    """The latency model's kind of one top-level ATen call (see `FIT_KINDS`); `nbytes` is the traffic the
    cost walk found (a "copy" that moved nothing is a view), `layout` that of its input
    (`lowformer.measure.opcost.image_layout`). A 3x3 depthwise conv runs another kernel on a
    channels-last input (0.3-0.7x the NCHW time on two threads of the development CPU, 512 channels at
    56 px: 0.6-0.8 ms against 2.2 ms), and copies a strided one to NCHW first (PVT-v2's token
    sequence viewed as an image at batch 1: 6.6 ms at that size). Dense convs and window pools run other
    kernels on a channels-last input too (in the sweep of a calibration on two threads of the development
    CPU, the channels-last time over the NCHW time at the same cell: window pools 0.08-0.42, median 0.13;
    1x1 and 3x3 convs 0.16-1.87, median 0.87-0.92), which a network whose norms keep channels-last
    (ConvNeXt, PoolFormer) hands them all. `inner_stride` is the stride of the
    input's last dimension (`lowformer.measure.opcost.inner_stride`): SDPA on a query whose head
    dimension is not contiguous (LowFormer's q, k and v, transposed chunks of one conv output) runs as
    matmuls and a softmax, not PyTorch's fused CPU kernel (two threads of the development CPU, 2 heads
    of 49 tokens: 51 us against 26 us; 4 heads of 196: 502 us against 254 us)."""
    op = name.split("::", 1)[-1].split(".", 1)[0]
    kind = classify_op(name, input_shapes, transposed)
    shapes = list(input_shapes or [])
    x, weight = (shapes[0], shapes[1]) if len(shapes) > 1 else ([], [])
    pointwise = len(weight) > 2 and all(k == 1 for k in weight[2:])
    if kind == "dense_conv":
        if len(x) > 1 and len(weight) > 1 and 1 < x[1] != weight[1]:  # C_in / groups < C_in: grouped
            return "grouped_conv"
        kind = "conv_1x1" if pointwise else "conv_kxk"
        return f"{kind}_channels_last" if layout == "channels_last" else kind
    if kind == "depthwise_conv":
        if len(x) > 1 and weight[0] != x[1]:  # a channel multiplier: C_out = k * C_in, another kernel
            return "depthwise_multiplier"
        if pointwise:
            return "depthwise_conv_1x1"
        if max(weight[2:], default=1) > 3:
            return "depthwise_conv_large"
        return {"channels_last": "depthwise_conv_channels_last", "strided": "depthwise_conv_strided"}.get(
            layout, "depthwise_conv"
        )
    if kind in ("transposed_conv", "linear"):
        return kind
    if kind == "attention":
        if op in _SDPA:
            return "sdpa" if inner_stride == 1 else "sdpa_strided"
        return "softmax" if op in _SOFTMAX else "matmul"
    if kind == "norm":
        return "batch_norm" if op in _BATCH_NORM else "layer_norm" if "layer_norm" in op else "group_norm"
    if kind == "activation":
        return "activation_exp" if op.rstrip("_") in _TRANSCENDENTAL else "activation"
    if kind == "reshape_copy":
        return ("concat" if op in ("cat", "stack") else "copy") if nbytes else "view"
    if op in _NO_OP:
        return "view"
    if op in _POOL:
        return "pool_channels_last" if layout == "channels_last" else "pool"
    if op in _REDUCE:
        return "reduce"
    if op in _RESAMPLE:
        return "resample"
    if op.rstrip("_") in _TRANSCENDENTAL:
        return "activation_exp"
    return "elementwise"


def fit_kind_of(cost: OpCost) -> str:
    """`fit_kind` of one call the cost walk recorded (`lowformer.measure.opcost.OpCost`)."""
    return fit_kind(cost.name, cost.input_shapes, cost.transposed, cost.bytes, cost.layout, cost.inner_stride)

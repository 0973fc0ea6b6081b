"""Small building blocks shared by the model families."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence

import torch
from timm.layers import DropPath
from torch import nn


class ConvNormAct(nn.Module):
    """Conv2d, then an optional norm and an optional activation.

    NOTE: not timm's ConvNormAct, because LowFormer needs a conv with an activation but no norm
    (the MBConv expand and depthwise convs), which timm's norm-act pairing cannot express.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        bias: bool = False,
        norm_layer: type[nn.Module] | None = nn.BatchNorm2d,
        act_layer: type[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_chs,
            out_chs,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=groups,
            bias=bias,
        )
        self.norm = norm_layer(out_chs) if norm_layer is not None else nn.Identity()
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))

    def conv_act_pairs(self) -> list[tuple[str, str]]:
        """(conv, activation) attribute pairs whose activation `forward` applies right to the conv's
        output, so deploy mode may run them as one kernel: ours once the norm is folded away."""
        return [("conv", "act")] if isinstance(self.norm, nn.Identity) else []

    def fuse(self) -> ConvNormAct:
        """Deploy mode: fold an eval-mode BatchNorm into the conv. Idempotent; returns self."""
        if isinstance(self.norm, nn.modules.batchnorm._BatchNorm):
            self.conv = fold_bn_into_conv(self.conv, self.norm)
            self.norm = nn.Identity().train(self.norm.training)
        return self


# --------------------------------------------------------------------------------------------
# The input rule, shared by every model (and asked by `lowformer.factory.check_image_size`)
# --------------------------------------------------------------------------------------------

MIN_IMAGE_SIZE = 32  # every model here downsamples by 32: a smaller input leaves no pixel in the last stage


def check_input_size(height: int, width: int, size_divisor: int = 1, label: str = "the model") -> None:
    """THE input-size rule: height and width >= `MIN_IMAGE_SIZE` and multiples of `size_divisor`.

    Raises:
        ValueError: naming the size, the rule and (for a divisor) the nearest sizes that satisfy it.
    """
    if height < MIN_IMAGE_SIZE or width < MIN_IMAGE_SIZE:
        raise ValueError(
            f"image size {height}x{width} is too small for {label}: height and width must be >= {MIN_IMAGE_SIZE}"
        )
    if height % size_divisor or width % size_divisor:
        up = lambda v: -(-v // size_divisor) * size_divisor  # noqa: E731
        raise ValueError(
            f"{label} needs height and width that are multiples of {size_divisor}, got {height}x{width} "
            f"(e.g. {up(height)}x{up(width)}); resize or pad the input"
        )


def check_input(x: torch.Tensor, size_divisor: int = 1, label: str = "the model") -> None:
    """What a model's forward asks of `x`: a 4D (batch, channels, height, width) tensor whose size
    passes `check_input_size`."""
    if x.dim() != 4:
        hint = " (add the batch dimension: x.unsqueeze(0))" if x.dim() == 3 else ""
        raise ValueError(f"{label} takes a 4D input (batch, channels, height, width), got shape {tuple(x.shape)}{hint}")
    if torch.jit.is_tracing():
        # sizes are traced values here; the check only raises, so it records nothing and its
        # "trace might not generalize" warnings are noise (export refuses bad sizes up front)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            check_input_size(int(x.shape[-2]), int(x.shape[-1]), size_divisor, label)
        return
    check_input_size(x.shape[-2], x.shape[-1], size_divisor, label)


def take_indices(num_features: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """timm's `feature_take_indices`, strict: (absolute indices, the largest).

    `indices` is None (all), an int n (the last n) or a sequence of indices (negative ones count from
    the end). The result follows the order of `feature_info`, so a sequence must be ascending without
    repeats; anything else raises ValueError listing the valid indices.
    """
    valid = f"valid indices: 0 to {num_features - 1} (or -{num_features} to -1), ascending, each once"
    if indices is None:
        return list(range(num_features)), num_features - 1
    if isinstance(indices, bool) or not isinstance(indices, (int, Sequence)):
        raise ValueError(f"out_indices must be an int or a sequence of ints, got {indices!r}; {valid}")
    if isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise ValueError(
                f"out_indices={indices} asks for the last {indices} of {num_features} features; "
                f"an int must be 1 to {num_features}"
            )
        return list(range(num_features - indices, num_features)), num_features - 1
    wanted = list(indices)
    if not wanted:
        raise ValueError(f"out_indices is empty; {valid}")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in wanted):
        raise ValueError(f"out_indices must be ints, got {wanted}; {valid}")
    bad = [i for i in wanted if not -num_features <= i < num_features]
    if bad:
        raise ValueError(
            f"out_indices {wanted}: {', '.join(map(str, bad))} out of range for {num_features} features; {valid}"
        )
    absolute = [i % num_features for i in wanted]
    if len(set(absolute)) != len(absolute):
        raise ValueError(f"out_indices {wanted} name a feature twice; {valid}")
    if absolute != sorted(absolute):
        raise ValueError(f"out_indices {wanted} are not in ascending order, and features come in that order; {valid}")
    return absolute, absolute[-1]


# --------------------------------------------------------------------------------------------
# Stochastic depth: one rule for every family
# --------------------------------------------------------------------------------------------


def set_drop_path(model: nn.Module, rate: float, skip: int = 0, per_block: bool = False) -> list[float]:
    """Stochastic depth on every residual branch of `model`, rising linearly in forward order.

    Blocks declare their residual branches in `drop_path_attrs` (attribute names of the Identity /
    DropPath modules their forward applies to each branch); `model.modules()` yields them in
    registration order, which is forward order. Each model class says which of the two official
    schedules it follows in its `drop_path_per_block` attribute (pass it as `per_block`):

    - per branch (LowFormer's recipe): branch i of the n after the first `skip` (which get none)
      drops with probability `rate * (i + 1) / n`;
    - per block (EdgeViT's, DeiT's): block i of n drops with `rate * i / (n - 1)`, shared by all
      its residual branches, those of sub-blocks that declare their own included.

    Returns the rate of every site, in order.
    """
    units = list(_drop_path_units(model)) if per_block else [[site] for site in _drop_path_sites(model)]
    active = len(units) - min(skip, len(units))
    if per_block:
        unit_rates = [rate * i / max(active - 1, 1) for i in range(active)]
    else:
        unit_rates = [rate * (i + 1) / active for i in range(active)]
    unit_rates = [0.0] * (len(units) - active) + unit_rates
    rates = []
    for sites, r in zip(units, unit_rates):
        for module, attr in sites:
            setattr(module, attr, DropPath(r) if r > 0 else nn.Identity())
            rates.append(r)
    return rates


def _drop_path_sites(module: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, a) for m in module.modules() for a in getattr(m, "drop_path_attrs", ())]


def _drop_path_units(module: nn.Module):
    """The outermost modules that declare residual branches, each with all the sites inside it."""
    if getattr(module, "drop_path_attrs", ()):
        yield _drop_path_sites(module)
        return
    for child in module.children():
        yield from _drop_path_units(child)


# ------------------------------------------------------------------------------------------
# Inference-time folding (deploy mode). Each function returns a new layer computing the same
# function as the pair it replaces, in eval mode.
# ------------------------------------------------------------------------------------------


def _affine_of(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) per channel of an eval-mode BatchNorm, or the affine of a Group/LayerNorm."""
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        return scale, norm.bias - norm.running_mean * scale
    return norm.weight, norm.bias


@torch.no_grad()
def fold_bn_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """conv -> bn as one conv with bias: W' = W * s, b' = (b - mean) * s + beta."""
    scale, shift = _affine_of(bn)
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=True,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(shift)
    fused.bias.copy_(bias * scale + shift)
    return fused.train(conv.training)


@torch.no_grad()
def fold_affine_into_next(norm: nn.Module, layer: nn.Module) -> nn.Module:
    """norm's per-channel affine folded into the following 1x1 conv or linear layer.

    layer(s * x + t) = (W diag s) x + (W t + b). Exact only for a layer that mixes channels at
    one position (a 1x1 conv without padding, or a linear layer), which is all this accepts.
    """
    if isinstance(layer, nn.Conv2d):
        if layer.kernel_size != (1, 1) or layer.groups != 1 or layer.padding not in ((0, 0), 0):
            raise ValueError("only an ungrouped 1x1 conv without padding can absorb a norm's affine exactly")
        weight = layer.weight.flatten(1)
    elif isinstance(layer, nn.Linear):
        weight = layer.weight
    else:
        raise TypeError(f"cannot fold a norm into {type(layer).__name__}")
    scale, shift = _affine_of(norm)
    out = copy.deepcopy(layer)
    out.weight = nn.Parameter((weight * scale.reshape(1, -1)).reshape(layer.weight.shape))
    out.bias = nn.Parameter(weight @ shift + (layer.bias if layer.bias is not None else 0))
    return out


def affine_free(norm: nn.Module) -> nn.Module:
    """The same normalisation without its learnable affine (after that was folded elsewhere);
    Identity for an eval-mode BatchNorm, whose whole effect is an affine."""
    return _affine_free(norm).train(norm.training)


def _affine_free(norm: nn.Module) -> nn.Module:
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):
        return nn.Identity()
    if isinstance(norm, nn.GroupNorm):
        return nn.GroupNorm(norm.num_groups, norm.num_channels, eps=norm.eps, affine=False)
    if type(norm) is nn.LayerNorm:  # not subclasses such as LayerNorm2d, which permute around the norm
        return nn.LayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=False)
    raise TypeError(f"no affine-free form of {type(norm).__name__}")

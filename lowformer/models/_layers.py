"""Small building blocks shared by the model families."""

from __future__ import annotations

import copy

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

    def fuse(self) -> ConvNormAct:
        """Deploy mode: fold an eval-mode BatchNorm into the conv. Idempotent; returns self."""
        if isinstance(self.norm, nn.modules.batchnorm._BatchNorm):
            self.conv = fold_bn_into_conv(self.conv, self.norm)
            self.norm = nn.Identity().train(self.norm.training)
        return self


def set_drop_path(model: nn.Module, rate: float, skip: int = 0) -> list[float]:
    """Stochastic depth on every residual branch, rising linearly in forward order.

    As the official LowFormer recipe does it: branch i of n (after the first `skip`, which get
    none) drops with probability `rate * (i + 1) / n`. Blocks declare their residual branches in
    `drop_path_attrs`; `model.modules()` yields them in registration order, which is forward order.
    Returns the rates assigned.
    """
    sites = [(m, a) for m in model.modules() for a in getattr(m, "drop_path_attrs", ())]
    active = sites[skip:]
    rates = [0.0] * min(skip, len(sites)) + [rate * (i + 1) / len(active) for i in range(len(active))]
    for (module, attr), r in zip(sites, rates):
        setattr(module, attr, DropPath(r) if r > 0 else nn.Identity())
    return rates


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

"""Small building blocks shared by the model families."""

from __future__ import annotations

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

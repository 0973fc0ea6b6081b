"""The official LowFormer trainer's own techniques, which timm has no piece for.

- `OfficialEma`: timm's ModelEmaV3 with the official decay warm-up, decay x (1 - exp(-step / 2000)).
- `DropPathSchedule`: the official drop path grows with training progress (0 -> its rate).
- `apply_drop_path`: the official linear rule over the backbone stages, with `skip`.
- `official_init`: truncated-normal init of every conv/linear, then each block's `zero_init_last()`
  hook (official `--rand_init trunc_normal@0.02 --last_gamma 0`).
- `reset_bn_stats`: recompute BatchNorm statistics of the evaluated model on training images.
- `mesa_targets`: the EMA model's predictions, the soft targets of "mesa" self-distillation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from timm.layers import DropPath
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..models._layers import set_drop_path
from .distributed import DistInfo, average_buffers

__all__ = [
    "DropPathSchedule",
    "OfficialEma",
    "apply_drop_path",
    "mesa_targets",
    "official_init",
    "reset_bn_stats",
]


class OfficialEma(ModelEmaV3):
    """EMA of parameters and buffers with the official warm-up of the decay.

    NOTE: the official code counts `step` in micro-batches (its scheduler steps per micro-batch);
    the trainer passes optimizer updates x grad_accum to match.
    """

    def __init__(self, model: nn.Module, decay: float, warmup_steps: int = 2000) -> None:
        super().__init__(model, decay=decay)
        self.warmup_steps = warmup_steps

    def get_decay(self, step: int | None = None) -> float:
        if step is None or self.warmup_steps <= 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-step / self.warmup_steps))


class DropPathSchedule:
    """Scale every DropPath's rate by training progress, clipped to [0, 1] (official `scheduled=True`)."""

    def __init__(self, model: nn.Module) -> None:
        self.sites = [(m, m.drop_prob) for m in model.modules() if isinstance(m, DropPath)]

    def update(self, progress: float) -> None:
        scale = min(max(progress, 0.0), 1.0)
        for module, rate in self.sites:
            module.drop_prob = rate * scale


def apply_drop_path(model: nn.Module, family: str, rate: float, skip: int) -> list[float]:
    """Drop path on the residual branches of the stages, linear in depth after the first `skip`.

    NOTE: the official code applies it to `backbone.stages` only, so the stem's residual blocks
    (B3, E2, E3) get none and `skip` counts from the first stage; the model's own
    `drop_path_rate` argument would include the stem.
    """
    if rate <= 0:
        return []
    if family != "lowformer":
        raise ValueError(f"apply_drop_path handles LowFormer; build {family} with drop_path_rate instead")
    return set_drop_path(model.stages, rate, skip=skip)


@torch.no_grad()
def official_init(model: nn.Module, std: float = 0.02, zero_last_gamma: bool = True) -> None:
    """The official training init: trunc-normal(std) conv and linear weights, zero biases, unit norms;
    then, with `zero_last_gamma`, every block that has a `zero_init_last()` hook (timm's convention)
    zeroes the end of its residual branch, so it starts as an identity. The blocks decide what that
    means for them (in LowFormer: the last BatchNorm of the residual conv blocks, as the official)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.ConvTranspose2d)):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (_BatchNorm, nn.GroupNorm, nn.LayerNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
    if zero_last_gamma:
        for m in model.modules():
            if callable(getattr(m, "zero_init_last", None)):
                m.zero_init_last()


@torch.no_grad()
def reset_bn_stats(model: nn.Module, batches: Iterable[torch.Tensor], info: DistInfo) -> int:
    """Replace every BatchNorm's running statistics by their average over `batches`.

    Everything else stays in eval mode (no drop path, no dropout); the BatchNorms run in training
    mode with a cumulative average (momentum None). Processes average their results. Returns the
    number of images seen. NOTE: the official code averages biased batch variances weighted by
    batch size; torch's cumulative average uses unbiased ones (a factor n / (n - 1) with n the
    pixels x images of a batch, below 1e-3 here).
    """
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    if not bns:
        return 0
    was_training = model.training
    model.eval()
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    seen = 0
    for x in batches:
        model(x)
        seen += x.shape[0]
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
        m.eval()
    model.train(was_training)
    for m in bns:
        average_buffers(m, info)
    return seen


@torch.no_grad()
def mesa_targets(ema_model: nn.Module, images: torch.Tensor, bce: bool) -> torch.Tensor:
    """Soft targets from the EMA model: sigmoid for BCE (official), softmax for cross-entropy."""
    logits = ema_model(images).float()
    return logits.sigmoid() if bce else logits.softmax(dim=-1)

"""Transforms, batch mixing and losses, assembled from timm and torchvision pieces.

The transforms end with uint8 tensors: normalisation, and random erasing (which works on normalised
images), run on the device (`pipeline.DeviceBatches`, `build_erasing`).

Only the pairing of mixed images is our own: timm's `Mixup` pairs image i with image B-1-i (a
flip), which needs an even batch; the official code pairs through a random permutation, so odd
per-process batches (B3's 75) work. `PermutedMixup` keeps timm's parameter sampling (Beta draw,
mixup/cutmix switch, cutmix box with lambda correction) and pairs as the official code does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.auto_augment import rand_augment_transform
from timm.data.mixup import Mixup, cutmix_bbox_and_lam, one_hot
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation, str_to_interp_mode
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torchvision import transforms as T

from .recipe import Recipe

__all__ = [
    "PermutedMixup",
    "build_erasing",
    "build_mixup",
    "eval_transform",
    "mean_std",
    "train_criterion",
    "train_transform",
]


def mean_std(recipe: Recipe, model: nn.Module | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation: the recipe's, else the model's data config, else ImageNet's."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = recipe.mean or cfg.get("mean") or IMAGENET_DEFAULT_MEAN
    std = recipe.std or cfg.get("std") or IMAGENET_DEFAULT_STD
    return tuple(mean), tuple(std)


def train_transform(recipe: Recipe, size: int, mean: Sequence[float]) -> T.Compose:
    """RandomResizedCrop -> flip -> RandAugment -> uint8 tensor (official order; normalisation and
    random erasing follow on the device). `mean` is RandAugment's fill colour."""
    interp = recipe.train_interpolation
    crop = RandomResizedCropAndInterpolation(
        size, scale=tuple(recipe.rrc_scale), ratio=tuple(recipe.rrc_ratio), interpolation="bilinear"
    )
    if isinstance(interp, str) and interp == "random":
        crop = RandomResizedCropAndInterpolation(size, tuple(recipe.rrc_scale), tuple(recipe.rrc_ratio), "random")
    elif isinstance(interp, str):
        crop.interpolation = str_to_interp_mode(interp)
    else:
        # a list: one drawn per image (timm's crop draws from a tuple); the official "random" is all six
        crop.interpolation = tuple(str_to_interp_mode(i) for i in interp)
    ops: list = [crop]
    if recipe.hflip > 0:
        ops.append(T.RandomHorizontalFlip(recipe.hflip))
    if recipe.randaugment:
        # the official RandAug hyperparameters: translate 45 %, fill with the mean colour, bicubic
        hparams = {
            "translate_pct": 0.45,
            "img_mean": tuple(min(255, round(255 * m)) for m in mean),
            "interpolation": Image.BICUBIC,  # timm's ops call PIL directly: a PIL filter, not a torchvision mode
        }
        ops.append(rand_augment_transform(recipe.randaugment, hparams))
    ops.append(T.PILToTensor())
    return T.Compose(ops)


def build_erasing(recipe: Recipe, device: torch.device) -> RandomErasing | None:
    """The official random erasing (timm's, constant 0 = the mean colour after normalisation), applied
    to a normalised batch on `device`, image by image, with Python's `random` (the trainer seeds it
    per micro-batch)."""
    if recipe.random_erase <= 0:
        return None
    return RandomErasing(recipe.random_erase, mode="const", device=device)


def eval_transform(size: int, crop_pct: float, interpolation: str) -> T.Compose:
    """Resize the short side to ceil(size / crop_pct), centre-crop `size` (the official rounding;
    timm's eval transform floors, 235 instead of 236 for 224 at 0.95), as a uint8 tensor."""
    return T.Compose(
        [
            T.Resize(int(math.ceil(size / crop_pct)), interpolation=str_to_interp_mode(interpolation)),
            T.CenterCrop(size),
            T.PILToTensor(),
        ]
    )


class PermutedMixup(Mixup):
    """timm's batch-mode Mixup/CutMix, pairing each image with a random other one (any batch size)."""

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lam, use_cutmix = self._params_per_batch()  # numpy RNG, as timm
        perm = torch.randperm(x.shape[0], device=x.device)
        if lam != 1.0:
            if use_cutmix:
                (yl, yh, xl, xh), lam = cutmix_bbox_and_lam(
                    x.shape, lam, ratio_minmax=self.cutmix_minmax, correct_lam=self.correct_lam
                )
                x[:, :, yl:yh, xl:xh] = x[perm][:, :, yl:yh, xl:xh]
            else:
                x = x * lam + x[perm] * (1.0 - lam)
        off = self.label_smoothing / self.num_classes
        y = one_hot(target, self.num_classes, on_value=1.0 - self.label_smoothing + off, off_value=off)
        return x, y * lam + y[perm] * (1.0 - lam)


def build_mixup(recipe: Recipe, num_classes: int) -> PermutedMixup | None:
    if not recipe.mixup_enabled:
        return None
    return PermutedMixup(
        mixup_alpha=recipe.mixup_alpha,
        cutmix_alpha=recipe.cutmix_alpha,
        prob=recipe.mixup_prob,
        switch_prob=recipe.mixup_switch_prob,
        mode="batch",
        label_smoothing=recipe.label_smoothing,
        num_classes=num_classes,
    )


def train_criterion(recipe: Recipe, soft_targets: bool) -> nn.Module:
    """The training loss; `soft_targets` when mixing already produced smoothed one-hot targets."""
    if recipe.bce:
        # mean over batch x classes, as the official nn.BCEWithLogitsLoss; smoothing as its label_smooth
        return BinaryCrossEntropy(smoothing=0.0 if soft_targets else recipe.label_smoothing)
    if soft_targets:
        return SoftTargetCrossEntropy()
    if recipe.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(recipe.label_smoothing)
    return nn.CrossEntropyLoss()

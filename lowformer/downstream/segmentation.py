"""Semantic segmentation: Semantic FPN (Kirillov et al., "Panoptic Feature Pyramid Networks",
arXiv:1901.02446) over our backbones, as the LowFormer and EdgeViT papers ran it on ADE20K (mmseg).

    model = semantic_fpn_lowformer("lowformer_b1", num_classes=150, checkpoint_path="evalmodel.pt")
    logits = model(images)          # (B, 3, H, W) normalised -> (B, 150, H, W)

Architecture (mmseg's `FPN` neck + `FPNHead`): an FPN (256 channels) over the four stage maps
(strides 4, 8, 16, 32); on each level a stack of 3x3 conv-norm-ReLU blocks (128 channels), each
followed by a 2x bilinear upsampling, until the level reaches stride 4 (one block for stride 4,
one for 8, two for 16, three for 32); the four maps are summed, dropout 0.1, a 1x1 classifier,
and the logits are upsampled bilinearly to the input size.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._loop import fit
from .backbone import BackboneWithFPN, create_backbone

SEMANTIC_FPN_STRIDES = (4, 8, 16, 32)

# NOTE: Kirillov et al. use GroupNorm (32 groups) in the head; mmseg's configs, which the papers
# ran, use (Sync)BatchNorm. GroupNorm does not depend on the batch, which suits small
# segmentation batches; pass norm_layer=nn.BatchNorm2d for mmseg's head.
GroupNorm32: Callable[[int], nn.Module] = functools.partial(nn.GroupNorm, 32)


class ConvNormReLU(nn.Sequential):
    def __init__(self, in_chs: int, out_chs: int, norm_layer: Callable[[int], nn.Module]) -> None:
        super().__init__(
            nn.Conv2d(in_chs, out_chs, 3, padding=1, bias=False), norm_layer(out_chs), nn.ReLU(inplace=True)
        )


class SemanticFPNHead(nn.Module):
    """Per-level conv-norm-ReLU (+ 2x upsampling) stacks to the finest stride, summed, then classified."""

    def __init__(
        self,
        strides: Sequence[int],
        in_channels: int = 256,
        channels: int = 128,
        num_classes: int = 150,
        dropout: float = 0.1,
        norm_layer: Callable[[int], nn.Module] = GroupNorm32,
    ) -> None:
        super().__init__()
        finest = strides[0]
        self.scale_heads = nn.ModuleList()
        for stride in strides:
            if stride < finest or math.log2(stride / finest) % 1:
                raise ValueError(f"level strides must be the finest stride times powers of 2, got {list(strides)}")
            layers: list[nn.Module] = []
            for k in range(max(1, int(math.log2(stride / finest)))):
                layers.append(ConvNormReLU(in_channels if k == 0 else channels, channels, norm_layer))
                if stride != finest:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        out = self.scale_heads[0](features[0])  # (B, channels, H/4, W/4)
        for head, f in zip(self.scale_heads[1:], features[1:]):
            # sizes differ by rounding when the input is not a multiple of the coarsest stride
            out = out + F.interpolate(head(f), size=out.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.dropout(out))


class SemanticFPN(nn.Module):
    """Backbone + FPN neck + `SemanticFPNHead`; full-resolution logits.

    Input: (B, C, H, W) normalised as for the classifier (the backbone's `pretrained_cfg` mean and
    std). Output: (B, num_classes, H, W) logits. An input whose sides are not multiples of the
    backbone's `size_divisor` (EdgeViT: 32) is zero-padded at the bottom and right, and the
    logits are cropped back.
    """

    def __init__(
        self,
        neck: BackboneWithFPN,
        num_classes: int,
        head_channels: int = 128,
        dropout: float = 0.1,
        norm_layer: Callable[[int], nn.Module] = GroupNorm32,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.neck = neck
        self.head = SemanticFPNHead(neck.strides, neck.out_channels, head_channels, num_classes, dropout, norm_layer)
        self.size_divisor = neck.size_divisor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        d = self.size_divisor
        pad_h, pad_w = (-h) % d, (-w) % d
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        logits = self.head(list(self.neck(x).values()))
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., :h, :w]


def semantic_fpn_lowformer(
    model: str | nn.Module,
    num_classes: int,
    *,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    out_indices: Sequence[int] | None = None,
    frozen_bn: bool | None = None,
    trainable_stages: int | None = None,
    fpn_channels: int = 256,
    head_channels: int = 128,
    dropout: float = 0.1,
    norm_layer: Callable[[int], nn.Module] = GroupNorm32,
) -> SemanticFPN:
    """Semantic FPN with one of our backbones (or any timm model, "timm:NAME").

    Args:
        model: "lowformer_b1", "edgevit_xs", "timm:resnet50", ... or a module (see `create_backbone`).
        num_classes: segmentation classes (150 for ADE20K).
        pretrained, checkpoint_path: classifier weights for the backbone (ImageNet).
        out_indices: backbone levels. Default: the stride 4, 8, 16, 32 maps.
        frozen_bn: freeze BatchNorm statistics and affines. Default: True with weights.
        trainable_stages: train only the deepest N levels. Default: all.
        fpn_channels, head_channels: 256 and 128, as mmseg's Semantic FPN.
        dropout: before the classifier (0.1 in mmseg).
        norm_layer: `norm_layer(channels)` for the head (default GroupNorm with 32 groups).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    backbone = create_backbone(
        model,
        out_indices=out_indices,
        strides=SEMANTIC_FPN_STRIDES,
        pretrained=pretrained,
        checkpoint_path=checkpoint_path,
        frozen_bn=frozen_bn,
        trainable_stages=trainable_stages,
    )
    neck = BackboneWithFPN(backbone, fpn_channels)
    return SemanticFPN(neck, num_classes, head_channels, dropout, norm_layer)


# What `lowformer bench --task segmentation` times: the whole Semantic FPN as the papers ran it on
# ADE20K (150 classes; the training crop, 512x512, as image size), logits at full resolution.
SEGMENTATION_BENCH_CLASSES = 150
SEGMENTATION_BENCH_IMAGE_SIZE = (512, 512)


def semantic_fpn_timing_model(model: str | nn.Module, num_classes: int = SEGMENTATION_BENCH_CLASSES) -> SemanticFPN:
    """A randomly initialised Semantic FPN in eval mode, for speed measurements.

    Backbone + FPN + head + the final upsampling, i.e. everything between an image and its
    (B, num_classes, H, W) logits; the output is one tensor, so TorchScript tracing and ONNX export
    take the model as it is. Unlike detection, whose shared heads and post-processing the benchmark
    leaves out, the head is part of what a Semantic FPN costs and is timed.
    """
    return semantic_fpn_lowformer(model, num_classes).eval()


def segmentation_loss(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], ignore_index: int = 255
) -> torch.Tensor:
    """Pixel-wise cross-entropy of (images (B, 3, H, W), masks (B, H, W) int64); `ignore_index` pixels skipped."""
    images, masks = batch
    return F.cross_entropy(model(images), masks, ignore_index=ignore_index)


def train_segmentation(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    steps: int,
    lr: float = 1e-4,
    weight_decay: float = 1e-4,
    grad_clip: float | None = None,
    ignore_index: int = 255,
    device: str | torch.device = "cpu",
    optimizer: torch.optim.Optimizer | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Minimal training loop for `SemanticFPN` (or any model giving (B, K, H, W) logits).

    `batches` yields (images (B, 3, H, W), masks (B, H, W) int64 class ids, `ignore_index` for
    unlabelled pixels, 255 as in mmseg's ADE20K loader). The default AdamW (lr 1e-4, weight
    decay 1e-4) is PVT's Semantic FPN setting, which later efficient backbones adopted; take the
    schedule (iterations, poly decay, batch, crop size) from the paper being reproduced.
    """
    return fit(
        model,
        batches,
        functools.partial(segmentation_loss, ignore_index=ignore_index),
        steps=steps,
        lr=lr,
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        device=device,
        optimizer=optimizer,
        on_step=on_step,
    )


def slide_inference(model: nn.Module, image: torch.Tensor, crop: Sequence[int], stride: Sequence[int]) -> torch.Tensor:
    """Logits of `image` (1, 3, H, W) from overlapping `crop` windows `stride` apart, averaged where
    they overlap (mmseg's `slide_inference`); windows at the border are shifted inside the image."""
    _, _, h, w = image.shape
    ch, cw = min(crop[0], h), min(crop[1], w)
    sh, sw = stride
    rows = max(h - ch + sh - 1, 0) // sh + 1
    cols = max(w - cw + sw - 1, 0) // sw + 1
    logits: torch.Tensor | None = None
    counts = torch.zeros(1, 1, h, w, device=image.device)
    for r in range(rows):
        for c in range(cols):
            y1, x1 = min(r * sh, h - ch), min(c * sw, w - cw)
            out = model(image[..., y1 : y1 + ch, x1 : x1 + cw])  # (1, K, ch, cw)
            if logits is None:
                logits = image.new_zeros(1, out.shape[1], h, w)
            logits[..., y1 : y1 + ch, x1 : x1 + cw] += out
            counts[..., y1 : y1 + ch, x1 : x1 + cw] += 1
    return logits / counts

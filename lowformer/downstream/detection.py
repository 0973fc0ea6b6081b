"""Object detection with our backbones: torchvision's RetinaNet and Faster R-CNN over a backbone + FPN.

    model = retinanet_lowformer("lowformer_b1", num_classes=91, checkpoint_path="evalmodel.pt")
    model.eval()(images)            # list of (3, H, W) tensors in [0, 1] -> list of {boxes, scores, labels}
    model.train()(images, targets)  # -> {"classification": ..., "bbox_regression": ...}

The detectors are torchvision's own (`torchvision.models.detection.RetinaNet` / `FasterRCNN`);
this module builds the backbone (`BackboneWithFPN`) and the anchors that fit its strides.

RetinaNet follows the LowFormer / EdgeViT papers (mmdet's RetinaNet): FPN over the stride 8, 16
and 32 maps, P6 and P7 computed from C5 ("on input"), 256 channels. Faster R-CNN follows
torchvision's: FPN over strides 4-32 plus a max-pooled level. Labels follow torchvision's COCO
convention: 0 is the background class of Faster R-CNN, so `num_classes` counts it.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from ._loop import fit
from .backbone import BackboneWithFPN, create_backbone

RETINANET_STRIDES = (8, 16, 32)
FASTERRCNN_STRIDES = (4, 8, 16, 32)
ASPECT_RATIOS = (0.5, 1.0, 2.0)


def retinanet_neck(
    model: str | nn.Module,
    *,
    fpn_channels: int = 256,
    out_indices: Sequence[int] | None = None,
    **backbone_kwargs,
) -> BackboneWithFPN:
    """Backbone + RetinaNet's FPN (C3-C5 -> P3-P7): what `retinanet_lowformer` runs before its head.

    Args:
        model, out_indices, **backbone_kwargs: see `create_backbone` (default levels: strides 8, 16, 32).
        fpn_channels: channels of every pyramid level.
    """
    backbone = create_backbone(model, out_indices=out_indices, strides=RETINANET_STRIDES, **backbone_kwargs)
    extra = LastLevelP6P7(backbone.channels[-1], fpn_channels)
    # NOTE: torchvision computes P6 from P5 whenever C5 happens to have `fpn_channels` channels
    # (it infers "P5" from equal widths). mmdet's RetinaNet, which the papers used, computes it from
    # C5 ("on_input"); fixing it keeps the architecture the same for every backbone width.
    extra.use_P5 = False
    return BackboneWithFPN(backbone, fpn_channels, extra_blocks=extra)


def fasterrcnn_neck(
    model: str | nn.Module,
    *,
    fpn_channels: int = 256,
    out_indices: Sequence[int] | None = None,
    **backbone_kwargs,
) -> BackboneWithFPN:
    """Backbone + Faster R-CNN's FPN (C2-C5 -> P2-P5 + a max-pooled P6), as torchvision's ResNet-50 FPN.

    Args:
        model, out_indices, **backbone_kwargs: see `create_backbone` (default levels: strides 4-32).
        fpn_channels: channels of every pyramid level.
    """
    backbone = create_backbone(model, out_indices=out_indices, strides=FASTERRCNN_STRIDES, **backbone_kwargs)
    return BackboneWithFPN(backbone, fpn_channels, extra_blocks=LastLevelMaxPool())


def anchor_generator(strides: Sequence[int], base_scale: float, octaves: int = 1) -> AnchorGenerator:
    """Anchors of size `base_scale * stride` per level (times 2^(i/octaves), i < octaves), three aspect ratios.

    Sizes follow the strides the backbone really has, so a backbone with other levels gets anchors
    that fit: for strides 8-128, base 4 and 3 octaves this is torchvision's (and mmdet's) RetinaNet
    set (32-512 px); for strides 4-64 and base 8, Faster R-CNN's.
    """
    sizes = tuple(tuple(int(base_scale * s * 2 ** (i / octaves)) for i in range(octaves)) for s in strides)
    return AnchorGenerator(sizes, (ASPECT_RATIOS,) * len(strides))


def _check_num_classes(num_classes: object, minimum: int, why: str) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < minimum:
        raise ValueError(f"num_classes must be an integer >= {minimum} ({why}), got {num_classes!r}")


def _detector_kwargs(detector: type[nn.Module], neck: BackboneWithFPN, kwargs: dict) -> dict:
    """`kwargs` checked against what the detector takes, plus the backbone's mean/std and size divisor.

    NOTE: torchvision's detectors pass unknown keyword arguments on to their input transform,
    which ignores them, so a misspelt option would be dropped silently; here it raises TypeError.
    """
    # a subclass (Mask R-CNN) passes its other keywords on to its parent (Faster R-CNN)
    lineage = detector.__mro__[: next(i for i, c in enumerate(detector.__mro__) if c in (FasterRCNN, RetinaNet)) + 1]
    known = set().union(*(_named_parameters(c.__init__) for c in lineage))
    known |= _named_parameters(GeneralizedRCNNTransform.__init__)
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(
            f"unknown {detector.__name__} option(s) {', '.join(unknown)}; it takes {', '.join(sorted(known))}"
        )
    cfg = neck.body.pretrained_cfg
    out = dict(kwargs)
    if "mean" in cfg and "image_mean" not in out:
        out["image_mean"] = list(cfg["mean"])
    if "std" in cfg and "image_std" not in out:
        out["image_std"] = list(cfg["std"])
    # EdgeViT needs multiples of 32; torchvision pads batches to 32 by default
    out.setdefault("size_divisible", max(32, neck.size_divisor))
    return out


def _named_parameters(fn: Callable) -> set[str]:
    skip = {"self", "backbone", "num_classes"}
    return {
        name
        for name, p in inspect.signature(fn).parameters.items()
        if name not in skip and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }


def retinanet_lowformer(
    model: str | nn.Module,
    num_classes: int,
    *,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    out_indices: Sequence[int] | None = None,
    frozen_bn: bool | None = None,
    trainable_stages: int | None = None,
    fpn_channels: int = 256,
    **kwargs,
) -> RetinaNet:
    """torchvision RetinaNet with one of our backbones (or any timm model, "timm:NAME").

    Args:
        model: "lowformer_b1", "edgevit_xs", "timm:resnet50", ... or a module (see `create_backbone`).
        num_classes: classes of the classification subnet (sigmoid per class; torchvision's COCO
            models use 91, the label ids of COCO with 0 unused).
        pretrained, checkpoint_path: classifier weights for the backbone (ImageNet).
        out_indices: backbone levels for C3-C5. Default: the stride 8, 16, 32 maps.
        frozen_bn: freeze BatchNorm statistics and affines. Default: True with weights.
        trainable_stages: train only the deepest N levels. Default: all.
        fpn_channels: FPN width (256 in the papers).
        **kwargs: `torchvision.models.detection.RetinaNet` options (`min_size`, `max_size`,
            `score_thresh`, `detections_per_img`, ...). By default images are resized to a
            shorter side of 800 (at most 1333), as torchvision's COCO recipe; use e.g.
            `min_size=512, max_size=512` for the papers' speed setting.

    Returns:
        a `RetinaNet` whose `backbone` is a `BackboneWithFPN` over a `FeatureBackbone`.
    """
    _check_num_classes(num_classes, 1, "one output per class")
    neck = retinanet_neck(
        model,
        fpn_channels=fpn_channels,
        out_indices=out_indices,
        pretrained=pretrained,
        checkpoint_path=checkpoint_path,
        frozen_bn=frozen_bn,
        trainable_stages=trainable_stages,
    )
    kwargs.setdefault("anchor_generator", anchor_generator(neck.strides, base_scale=4, octaves=3))
    return RetinaNet(neck, num_classes=num_classes, **_detector_kwargs(RetinaNet, neck, kwargs))


def fasterrcnn_lowformer(
    model: str | nn.Module,
    num_classes: int,
    *,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    out_indices: Sequence[int] | None = None,
    frozen_bn: bool | None = None,
    trainable_stages: int | None = None,
    fpn_channels: int = 256,
    **kwargs,
) -> FasterRCNN:
    """torchvision Faster R-CNN with one of our backbones (or any timm model, "timm:NAME").

    Args:
        num_classes: classes including the background (label 0), as torchvision's Faster R-CNN
            counts them: 2 for one object class.
        out_indices: backbone levels for C2-C5. Default: the stride 4, 8, 16, 32 maps.
        others: as `retinanet_lowformer`; `**kwargs` go to `torchvision.models.detection.FasterRCNN`.
    """
    _check_num_classes(num_classes, 2, "the background class 0 and at least one object class")
    neck = fasterrcnn_neck(
        model,
        fpn_channels=fpn_channels,
        out_indices=out_indices,
        pretrained=pretrained,
        checkpoint_path=checkpoint_path,
        frozen_bn=frozen_bn,
        trainable_stages=trainable_stages,
    )
    kwargs.setdefault("rpn_anchor_generator", anchor_generator(neck.strides, base_scale=8))
    roi_levels = [n for n, s in zip(neck.names, neck.strides) if n != "pool"]
    kwargs.setdefault("box_roi_pool", MultiScaleRoIAlign(roi_levels, output_size=7, sampling_ratio=2))
    return FasterRCNN(neck, num_classes=num_classes, **_detector_kwargs(FasterRCNN, neck, kwargs))


def maskrcnn_lowformer(
    model: str | nn.Module,
    num_classes: int,
    *,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    out_indices: Sequence[int] | None = None,
    frozen_bn: bool | None = None,
    trainable_stages: int | None = None,
    fpn_channels: int = 256,
    **kwargs,
) -> MaskRCNN:
    """torchvision Mask R-CNN with one of our backbones (or any timm model, "timm:NAME"): Faster
    R-CNN's neck, anchors and box RoIAlign, plus a mask branch (RoIAlign 14x14 over the same levels).

    Args: as `fasterrcnn_lowformer` (`num_classes` counts the background); `**kwargs` go to
    `torchvision.models.detection.MaskRCNN`.
    """
    _check_num_classes(num_classes, 2, "the background class 0 and at least one object class")
    neck = fasterrcnn_neck(
        model,
        fpn_channels=fpn_channels,
        out_indices=out_indices,
        pretrained=pretrained,
        checkpoint_path=checkpoint_path,
        frozen_bn=frozen_bn,
        trainable_stages=trainable_stages,
    )
    kwargs.setdefault("rpn_anchor_generator", anchor_generator(neck.strides, base_scale=8))
    roi_levels = [n for n, s in zip(neck.names, neck.strides) if n != "pool"]
    kwargs.setdefault("box_roi_pool", MultiScaleRoIAlign(roi_levels, output_size=7, sampling_ratio=2))
    kwargs.setdefault("mask_roi_pool", MultiScaleRoIAlign(roi_levels, output_size=14, sampling_ratio=2))
    return MaskRCNN(neck, num_classes=num_classes, **_detector_kwargs(MaskRCNN, neck, kwargs))


def detection_loss(model: nn.Module, batch: tuple[list[torch.Tensor], list[dict]]) -> torch.Tensor:
    """Sum of a torchvision detector's training losses on one (images, targets) batch."""
    images, targets = batch
    losses = model(images, targets)
    return sum(losses.values())


def train_detection(
    model: nn.Module,
    batches: Iterable[tuple[list[torch.Tensor], list[dict]]],
    *,
    steps: int,
    lr: float = 1e-4,
    weight_decay: float = 1e-4,
    grad_clip: float | None = 35.0,
    device: str | torch.device = "cpu",
    optimizer: torch.optim.Optimizer | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Minimal training loop for a torchvision detector; returns the loss of every step.

    `batches` yields (images, targets) as torchvision's detectors take them: a list of (3, H, W)
    float tensors in [0, 1] and a list of {"boxes": (N, 4) xyxy pixels, "labels": (N,) int64}.
    It is cycled when shorter than `steps`. The default optimiser is AdamW (lr 1e-4, weight decay
    1e-4), PVT's RetinaNet setting (batch 16, 12 epochs), which later efficient backbones adopted;
    the gradient-norm clip of 35 is mmdet's RetinaNet default.
    """
    return fit(
        model,
        batches,
        detection_loss,
        steps=steps,
        lr=lr,
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        device=device,
        optimizer=optimizer,
        on_step=on_step,
    )


# the detectors `lowformer detect` trains, by recipe name
DETECTOR_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "retinanet": retinanet_lowformer,
    "fasterrcnn": fasterrcnn_lowformer,
    "maskrcnn": maskrcnn_lowformer,
}

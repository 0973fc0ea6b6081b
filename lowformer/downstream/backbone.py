"""Backbones for dense prediction: stage feature maps, frozen BatchNorm and frozen stages, and an FPN.

Everything here relies only on timm's model contract (`feature_info`, `forward_intermediates`),
so the same code serves LowFormer, EdgeViT and any timm model (`"timm:NAME"`).

`FeatureBackbone` returns the selected stage maps as a list (strides 4, 8, 16, 32 for our models);
`BackboneWithFPN` puts torchvision's `FeaturePyramidNetwork` on top and returns the ordered dict of
maps, with the `out_channels` attribute torchvision's RetinaNet, Faster R-CNN and Mask R-CNN read.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from timm.models._features import FeatureGetterNet
from torch import nn
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork

from ..factory import create_model, model_source
from ..models import get_entry


class FeatureBackbone(nn.Module):
    """Stage feature maps of a classification model, as a list, for a detection or segmentation neck.

    Wraps a timm-contract feature extractor (`FeatureGetterNet`: `forward_intermediates` of the
    classifier, its head pruned) and adds what fine-tuning a dense-prediction model needs:

    - `frozen_bn`: every BatchNorm normalises with its running statistics and its affine is frozen,
      as torchvision's `FrozenBatchNorm2d` does (detection batches are small: 2-16 images, too few
      for good batch statistics). NOTE: implemented as eval-mode `BatchNorm2d` with
      `requires_grad=False` (mmdet's `norm_eval`) rather than by swapping in `FrozenBatchNorm2d`,
      so module types and state-dict keys stay those of the classifier, and deploy mode still
      folds every BatchNorm into its conv.
    - `trainable_stages`: only the deepest `trainable_stages` feature levels train; the stem and
      the levels before them are frozen (no gradients, always in eval mode), as torchvision's
      `trainable_backbone_layers` / mmdet's `frozen_stages`. None: everything trains.

    Attributes:
        feature_info: timm `FeatureInfo` of the wrapped extractor.
        channels: channels of each returned map.
        strides: stride (reduction) of each returned map.
        size_divisor: input height and width must be multiples of this (EdgeViT: 32).
        pretrained_cfg: the classifier's data config (mean, std, ...), for input normalisation.
    """

    def __init__(
        self,
        body: nn.Module,
        *,
        frozen_bn: bool = False,
        trainable_stages: int | None = None,
        size_divisor: int = 1,
        pretrained_cfg: dict | None = None,
    ) -> None:
        super().__init__()
        if not hasattr(body, "feature_info"):
            raise ValueError(f"{type(body).__name__} has no feature_info: not a features-only extractor")
        self.body = body
        self.feature_info = body.feature_info
        self.channels: list[int] = list(self.feature_info.channels())
        self.strides: list[int] = list(self.feature_info.reduction())
        self.size_divisor = size_divisor
        self.pretrained_cfg = dict(pretrained_cfg or {})
        self.frozen_bn = frozen_bn
        self.trainable_stages = trainable_stages
        self._frozen_modules, stem_params = self._frozen_parts(trainable_stages)
        frozen = [p for name in self._frozen_modules for p in self.get_submodule(name).parameters()] + stem_params
        if frozen_bn:
            bns = [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            frozen += [p for m in bns for p in m.parameters(recurse=False)]
        for p in frozen:
            p.requires_grad_(False)
        self.train(self.training)

    def _frozen_parts(self, trainable_stages: int | None) -> tuple[list[str], list[nn.Parameter]]:
        """Modules (names relative to self) computed before the first trainable level, and the
        parameters held directly by the modules enclosing that level (e.g. a ViT's position
        embedding), which belong to the stem."""
        if trainable_stages is None:
            return [], []
        info = self.feature_info.info  # every level of the (pruned) model, not only those returned
        num_levels = len(info)
        if not 0 <= trainable_stages <= num_levels + 1:
            raise ValueError(
                f"trainable_stages must be between 0 (all frozen) and {num_levels + 1} (all trainable, stem "
                f"included) for a backbone with {num_levels} feature levels, got {trainable_stages}"
            )
        if trainable_stages == num_levels + 1:
            return [], []
        if trainable_stages == 0:
            return ["body"], []
        if not isinstance(self.body, FeatureGetterNet):
            raise ValueError(f"trainable_stages needs a FeatureGetterNet body, got {type(self.body).__name__}")
        target = "body.model." + info[num_levels - trainable_stages]["module"]
        modules: list[str] = []
        params: list[nn.Parameter] = []
        for name, module in self.named_modules():
            if name == target:
                break
            if not name or target.startswith(name + "."):
                params.extend(module.parameters(recurse=False))
            elif not any(name.startswith(f + ".") for f in modules):
                modules.append(name)
        return modules, params

    def train(self, mode: bool = True) -> FeatureBackbone:
        """Train mode, except for frozen stages (and, with `frozen_bn`, every BatchNorm)."""
        super().train(mode)
        if mode:
            frozen = set(self._frozen_modules)
            for name, m in self.named_modules():
                if name in frozen or (self.frozen_bn and isinstance(m, nn.modules.batchnorm._BatchNorm)):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.body(x))


class BackboneWithFPN(nn.Module):
    """A `FeatureBackbone` with torchvision's FPN on top: torchvision's detection backbone interface.

    Like `torchvision.models.detection.backbone_utils.BackboneWithFPN`, but over timm-contract
    feature extractors instead of `IntermediateLayerGetter` (which needs a ResNet-like module
    tree). The output maps are named "0", "1", ... in order of stride, then the extra block's
    ("pool" for `LastLevelMaxPool`, "p6", "p7" for `LastLevelP6P7`).

    Attributes:
        out_channels: channels of every output map (torchvision's detectors read it).
        strides: stride of every output map, extra levels included.
    """

    def __init__(
        self,
        backbone: FeatureBackbone,
        out_channels: int = 256,
        extra_blocks: ExtraFPNBlock | None = None,
        norm_layer: Callable[..., nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if out_channels < 1:
            raise ValueError(f"out_channels must be >= 1, got {out_channels}")
        self.body = backbone
        self.fpn = FeaturePyramidNetwork(
            backbone.channels, out_channels, extra_blocks=extra_blocks, norm_layer=norm_layer
        )
        self.out_channels = out_channels
        extra = _extra_levels(extra_blocks)
        self.names = [str(i) for i in range(len(backbone.strides))] + extra
        self.strides = list(backbone.strides) + [backbone.strides[-1] * 2 ** (i + 1) for i in range(len(extra))]
        self.size_divisor = backbone.size_divisor

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        features = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))


def _extra_levels(extra_blocks: ExtraFPNBlock | None) -> list[str]:
    """Names of the maps an extra FPN block appends (found by running it on dummy maps)."""
    if extra_blocks is None:
        return []
    # NOTE: torchvision's extra blocks do not declare what they add; a 1x1 dry run tells us,
    # and works for user-defined blocks too.
    try:
        with torch.no_grad():
            p = [torch.zeros(1, _in_channels(extra_blocks, "out"), 4, 4)]
            c = [torch.zeros(1, _in_channels(extra_blocks, "in"), 4, 4)]
            _, names = extra_blocks(p, c, ["0"])
    except Exception as e:
        raise ValueError(f"cannot determine the levels {type(extra_blocks).__name__} adds: {e}") from e
    return list(names[1:])


def _in_channels(block: nn.Module, which: str) -> int:
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        return 1
    return convs[0].in_channels if which == "in" else convs[-1].out_channels


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


def create_backbone(
    model: str | nn.Module,
    *,
    out_indices: Sequence[int] | None = None,
    strides: Sequence[int] = (4, 8, 16, 32),
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    frozen_bn: bool | None = None,
    trainable_stages: int | None = None,
    **model_kwargs,
) -> FeatureBackbone:
    """A `FeatureBackbone` over one of our models, a timm model, or a model instance.

    Args:
        model: our registered name ("lowformer_b1", "edgevit_xs"), "timm:NAME" for any timm model
            with feature support, or an `nn.Module` with timm's contract (`feature_info`,
            `forward_intermediates`), e.g. a `LowFormer(spec)`.
        out_indices: which feature levels to return (timm semantics: indices into the model's
            `feature_info`). Default: the levels at `strides`.
        strides: the strides to return when `out_indices` is not given; picked by stride rather
            than by index because models differ in which levels they have (timm's MobileNetV3
            has a stride-2 level, ResNet a stride-2 stem level, ours start at stride 4).
        pretrained: our models: the official weights from the local weights dir (see
            `lowformer.create_model`); timm models: timm's pretrained weights (timm may download).
        checkpoint_path: weights for the classifier, loaded strictly before the head is dropped.
        frozen_bn: see `FeatureBackbone`. Default: True when weights are loaded, else False, as
            torchvision does (frozen statistics of a random init would never normalise anything).
        trainable_stages: see `FeatureBackbone`. Default: everything trains.
        **model_kwargs: passed to the model builder (e.g. `drop_path_rate`).

    Raises:
        ValueError: unknown model (with close matches), a model without feature support, or
            strides the model does not have.
    """
    with_weights = pretrained or checkpoint_path is not None
    if frozen_bn is None:
        frozen_bn = with_weights
    size_divisor = 1
    if isinstance(model, nn.Module):
        if with_weights:
            raise ValueError("pretrained/checkpoint_path apply to a model name; load weights into the module first")
        net = model
        label = type(model).__name__
    elif isinstance(model, str):
        net = create_model(model, pretrained=pretrained, checkpoint_path=checkpoint_path, **model_kwargs)
        if model_source(model) == "lowformer":
            size_divisor = get_entry(model).size_divisor
        label = model
    else:
        raise TypeError(f"model must be a name or an nn.Module, got {type(model).__name__}")

    info = _feature_info_of(net, label)
    indices = tuple(out_indices) if out_indices is not None else _indices_for_strides(info, strides, label)
    bad = [i for i in indices if not -len(info) <= i < len(info)]
    if bad or not indices:
        raise ValueError(f"out_indices {list(indices)} out of range for {label}, which has {len(info)} feature levels")
    if not hasattr(net, "forward_intermediates"):
        raise ValueError(
            f"{label} has feature_info but no forward_intermediates, which the backbone uses to return its "
            "stage maps (timm >= 1.0 models have it)"
        )
    body = FeatureGetterNet(net, out_indices=indices)
    return FeatureBackbone(
        body,
        frozen_bn=frozen_bn,
        trainable_stages=trainable_stages,
        size_divisor=size_divisor,
        pretrained_cfg=getattr(net, "pretrained_cfg", None),
    )


def _feature_info_of(net: nn.Module, label: str) -> list[dict]:
    info = getattr(net, "feature_info", None)
    if isinstance(info, list) and info and all("reduction" in d and "num_chs" in d for d in info):
        return info
    raise ValueError(
        f"{label} does not support feature extraction (no timm feature_info): a dense-prediction backbone "
        "needs a model with timm's features_only contract"
    )


def _indices_for_strides(info: list[dict], strides: Sequence[int], label: str) -> tuple[int, ...]:
    """For each stride, the deepest level with that reduction."""
    have = [d["reduction"] for d in info]
    indices = []
    for s in strides:
        matches = [i for i, r in enumerate(have) if r == s]
        if not matches:
            raise ValueError(
                f"{label} has no feature level at stride {s} (its levels have strides {have}); "
                "pass out_indices to choose levels explicitly"
            )
        indices.append(matches[-1])
    return tuple(indices)

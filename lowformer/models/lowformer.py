"""LowFormer: hardware-efficient convolutional transformer backbones.

- "LowFormer: Hardware Efficient Design for Convolutional Transformer Backbones", Nottebaum,
  Dunnhofer, Micheloni, WACV 2025, arXiv:2409.03460.
- "Beyond MACs: Hardware Efficient Architecture Design for Vision Backbones", IJCV 2026 (the
  attention-free edge-GPU variants E1-E3).
- Official code: github.com/altair199797/LowFormer (Apache-2.0). This is an independent
  implementation that reproduces the official standalone model (`lowformer_model.py`) exactly:
  same parameters, same function, and it loads the official and timm checkpoints.

Layout of this file: blocks -> stage -> model -> metadata -> checkpoint conversion -> presets.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import GroupNorm1
from timm.models._manipulate import checkpoint_seq, reparameterize_model
from torch import nn

from ._keymap import batchnorm, detect_format, rename, unknown_layout, weight_bias
from ._layers import ConvNormAct, affine_free, check_input, fold_affine_into_next, set_drop_path, take_indices
from ._registry import register_model

__all__ = ["LowFormer", "LowFormerSpec", "StageSpec", "Lowtention", "convert_state_dict"]


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


class FusedMBConv(nn.Module):
    """k x k expand conv (BN, act) then 1x1 project conv (BN), optional identity shortcut."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        expand_ratio: float = 4.0,
        expand_bias: bool = False,
        has_skip: bool = True,
        act_layer: type[nn.Module] = nn.Hardswish,
    ) -> None:
        super().__init__()
        mid_chs = round(in_chs * expand_ratio)
        self.has_skip = has_skip and stride == 1 and in_chs == out_chs
        self.drop_path_attrs = ("drop_path",) if self.has_skip else ()  # residual branches only
        self.conv_exp = ConvNormAct(in_chs, mid_chs, 3, stride=stride, bias=expand_bias, act_layer=act_layer)
        self.conv_pwl = ConvNormAct(mid_chs, out_chs, 1)
        self.drop_path = nn.Identity()

    def zero_init_last(self) -> None:
        """Zero the projection's BatchNorm scale so a residual block starts as an identity (the
        official `--last_gamma 0`); without a shortcut the block keeps its initialisation."""
        if self.has_skip:
            nn.init.zeros_(self.conv_pwl.norm.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_pwl(self.conv_exp(x))
        return x + self.drop_path(out) if self.has_skip else out


class MBConv(nn.Module):
    """Inverted residual as LowFormer uses it in wide blocks, with an identity shortcut.

    NOTE: the expand and depthwise convs have a bias and an activation but no BatchNorm; only
    the projection is normalised (official `MBConv(norm=(None, None, "bn2d"))`).
    """

    drop_path_attrs = ("drop_path",)

    def __init__(self, chs: int, expand_ratio: float = 4.0, act_layer: type[nn.Module] = nn.Hardswish) -> None:
        super().__init__()
        mid_chs = round(chs * expand_ratio)
        self.conv_pw = ConvNormAct(chs, mid_chs, 1, bias=True, norm_layer=None, act_layer=act_layer)
        self.conv_dw = ConvNormAct(mid_chs, mid_chs, 3, groups=mid_chs, bias=True, norm_layer=None, act_layer=act_layer)
        self.conv_pwl = ConvNormAct(mid_chs, chs, 1)
        self.drop_path = nn.Identity()

    def zero_init_last(self) -> None:
        """Zero the projection's BatchNorm scale so the block starts as an identity (official `--last_gamma 0`)."""
        nn.init.zeros_(self.conv_pwl.norm.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.conv_pwl(self.conv_dw(self.conv_pw(x))))


def lowtention_heads(dim: int) -> tuple[int, int]:
    """(num_heads, head_dim) of Lowtention on `dim` channels, as the official code sizes them.

    Attention runs at half the channels: one head per 30 of the halved width, each head
    `dim // num_heads // 2` wide (e.g. 128 -> 2 x 32, 160 -> 2 x 40, 256 -> 4 x 32).
    """
    num_heads = max(1, int(dim * 0.5) // 30)
    head_dim = int((dim // num_heads) * 0.5)
    return num_heads, head_dim


class Lowtention(nn.Module):
    """Slimmed attention on a downsampled, channel-reduced map, upsampled by a transposed conv.

    x (B, C, H, W) -> depthwise k x k conv, stride s, BN -> 1x1 conv to q, k, v of heads x
    head_dim (= C / 2) channels each -> scaled dot-product attention over the (H/s * W/s) tokens
    -> transposed conv (stride s) back to C channels -> crop to (H, W).

    The output projection is folded into the (dense) transposed conv, as in all official
    presets (`fuseconv=True`).
    """

    def __init__(self, dim: int, stride: int = 2) -> None:
        super().__init__()
        self.num_heads, self.head_dim = lowtention_heads(dim)
        attn_dim = self.num_heads * self.head_dim
        kernel_size = 5 if stride > 1 else 3
        self.stride = stride
        self.down = ConvNormAct(dim, dim, kernel_size, stride=stride, groups=dim)
        self.qkv = nn.Conv2d(dim, 3 * attn_dim, 1, bias=False)
        if stride > 1:
            self.up = nn.ConvTranspose2d(attn_dim, dim, 2 * stride, stride=stride, padding=stride // 2)
        else:
            self.up = nn.ConvTranspose2d(attn_dim, dim, 3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        qkv = self.qkv(self.down(x))
        B, _, h, w = qkv.shape
        # channels are grouped per head as [q | k | v], each head_dim wide
        qkv = qkv.reshape(B, self.num_heads, 3 * self.head_dim, h * w).transpose(-1, -2)  # (B, heads, hw, 3*hd)
        q, k, v = qkv.chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, hw, hd)
        out = out.transpose(-1, -2).reshape(B, self.num_heads * self.head_dim, h, w)
        out = self.up(out)
        # NOTE: with odd sizes the stride-s up-conv overshoots by up to s - 1 pixels; crop as official
        return out[..., :H, :W]


class ConvMlp(nn.Module):
    """1x1 conv MLP with exact GELU."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = round(dim * mlp_ratio)
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def conv_act_pairs(self) -> list[tuple[str, str]]:
        """(conv, activation) pairs deploy mode may run as one kernel (see `ConvNormAct.conv_act_pairs`)."""
        return [("fc1", "act")]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LowFormerBlock(nn.Module):
    """[x + Lowtention(GN(x))] -> [x + MLP(GN(x))] -> local inverted-residual conv block.

    Each part can be absent (the E-variants). NOTE: the official code puts the GroupNorm in front
    of the attention only when the MLP is also present; `attn_norm` reproduces that (E3).
    """

    drop_path_attrs = ("drop_path1", "drop_path2")

    def __init__(
        self,
        dim: int,
        attn: bool = True,
        attn_norm: bool = True,
        attn_stride: int = 1,
        mlp: bool = True,
        mlp_ratio: float = 4.0,
        expand_ratio: float = 4.0,
        fused_local: bool = True,
        act_layer: type[nn.Module] = nn.Hardswish,
    ) -> None:
        super().__init__()
        self.norm1 = GroupNorm1(dim) if attn and attn_norm else nn.Identity()
        self.attn = Lowtention(dim, stride=attn_stride) if attn else None
        self.drop_path1 = nn.Identity()
        self.norm2 = GroupNorm1(dim) if mlp else nn.Identity()
        self.mlp = ConvMlp(dim, mlp_ratio) if mlp else None
        self.drop_path2 = nn.Identity()
        if fused_local:
            self.local = FusedMBConv(dim, dim, expand_ratio=expand_ratio, expand_bias=True, act_layer=act_layer)
        else:
            self.local = MBConv(dim, expand_ratio=expand_ratio, act_layer=act_layer)

    def reparameterize(self) -> None:
        """Deploy mode: fold the MLP's GroupNorm affine into its first 1x1 conv (exact).

        NOTE: the attention's GroupNorm keeps its affine: the next layer is a zero-padded k x k
        depthwise conv, through which the shift is not a constant, so folding it would not be exact.
        """
        if self.mlp is not None and getattr(self.norm2, "affine", False):
            self.mlp.fc1 = fold_affine_into_next(self.norm2, self.mlp.fc1)
            self.norm2 = affine_free(self.norm2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attn is not None:
            x = x + self.drop_path1(self.attn(self.norm1(x)))
        if self.mlp is not None:
            x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return self.local(x)


# --------------------------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageSpec:
    """One stride-2 stage.

    kind="conv": `depth` FusedMBConv blocks, the first of them strided (no shortcut).
    kind="attention": a strided FusedMBConv, then `depth` LowFormer blocks.
    `depth` follows the paper's depth lists in both cases.
    """

    width: int
    depth: int
    kind: str = "conv"
    downsample_expand: float = 4.0
    attn: bool = True
    attn_norm: bool = True
    attn_stride: int = 1
    mlp: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("conv", "attention"):
            raise ValueError(f"StageSpec.kind must be 'conv' or 'attention', got {self.kind!r}")
        if self.width <= 0 or self.depth < 0:
            raise ValueError(f"StageSpec needs width > 0 and depth >= 0, got width={self.width}, depth={self.depth}")
        if self.kind == "conv" and self.depth < 1:
            raise ValueError("a 'conv' stage needs depth >= 1: its first block is the stride-2 downsample")
        if self.attn_stride not in (1, 2, 4):
            raise ValueError(f"StageSpec.attn_stride must be 1, 2 or 4, got {self.attn_stride}")


@dataclass(frozen=True)
class LowFormerSpec:
    """The whole architecture as data: a preset is one of these, a new variant is another.

    Attributes:
        stem_width: channels of the stride-2 stem conv.
        stem_depth: residual FusedMBConv blocks after the stem conv.
        stem_expand: expansion ratio of those stem blocks.
        stages: the four stride-2 stages.
        expand_ratio: expansion of every non-downsampling conv block.
        mlp_ratio: hidden width of the LowFormer-block MLP, as a multiple of the channels.
        fused_below: the local block of a LowFormer block is a FusedMBConv below this many
            channels and an MBConv at or above it.
        head_widths: (1x1 conv width, pre-logits width) of the classifier head.
    """

    stem_width: int
    stages: tuple[StageSpec, ...]
    stem_depth: int = 0
    stem_expand: float = 2.0
    expand_ratio: float = 4.0
    mlp_ratio: float = 4.0
    fused_below: int = 256
    head_widths: tuple[int, int] = (1536, 1600)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LowFormerSpec:
        d = dict(d)
        d["stages"] = tuple(StageSpec(**s) for s in d["stages"])
        d["head_widths"] = tuple(d["head_widths"])
        return cls(**d)


class Stage(nn.Module):
    def __init__(self, in_chs: int, spec: StageSpec, model_spec: LowFormerSpec, act_layer: type[nn.Module]) -> None:
        super().__init__()
        self.downsample = FusedMBConv(
            in_chs, spec.width, stride=2, expand_ratio=spec.downsample_expand, act_layer=act_layer
        )
        if spec.kind == "conv":
            blocks = [
                FusedMBConv(spec.width, spec.width, expand_ratio=model_spec.expand_ratio, act_layer=act_layer)
                for _ in range(spec.depth - 1)
            ]
        else:
            blocks = [
                LowFormerBlock(
                    spec.width,
                    attn=spec.attn,
                    attn_norm=spec.attn_norm,
                    attn_stride=spec.attn_stride,
                    mlp=spec.mlp,
                    mlp_ratio=model_spec.mlp_ratio,
                    expand_ratio=model_spec.expand_ratio,
                    fused_local=spec.width < model_spec.fused_below,
                    act_layer=act_layer,
                )
                for _ in range(spec.depth)
            ]
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class Stem(nn.Module):
    def __init__(self, in_chans: int, spec: LowFormerSpec, act_layer: type[nn.Module]) -> None:
        super().__init__()
        self.conv = ConvNormAct(in_chans, spec.stem_width, 3, stride=2, act_layer=act_layer)
        self.blocks = nn.Sequential(
            *[
                FusedMBConv(spec.stem_width, spec.stem_width, expand_ratio=spec.stem_expand, act_layer=act_layer)
                for _ in range(spec.stem_depth)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.conv(x))


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class ClassifierHead(nn.Module):
    """1x1 conv (BN, act) -> global average pool -> linear (no bias) -> LayerNorm -> act -> linear."""

    def __init__(
        self,
        in_chs: int,
        widths: tuple[int, int],
        num_classes: int,
        drop_rate: float = 0.0,
        act_layer: type[nn.Module] = nn.Hardswish,
    ) -> None:
        super().__init__()
        self.in_conv = ConvNormAct(in_chs, widths[0], 1, act_layer=act_layer)
        self.pre_fc = nn.Linear(widths[0], widths[1], bias=False)
        self.pre_norm = nn.LayerNorm(widths[1])
        self.pre_act = act_layer()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(widths[1], num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.in_conv(x).mean((2, 3))
        x = self.drop(self.pre_act(self.pre_norm(self.pre_fc(x))))
        return x if pre_logits else self.fc(x)


def default_cfg(**kwargs) -> dict:
    """Data config in timm's `pretrained_cfg` convention (timm.data.resolve_data_config reads it)."""
    return {
        "input_size": (3, 224, 224),
        "crop_pct": 0.95,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "num_classes": 1000,
        "first_conv": "stem.conv.conv",
        "classifier": "head.fc",
        **kwargs,
    }


class LowFormer(nn.Module):
    """LowFormer classifier built from a `LowFormerSpec`, with timm's model contract.

    Any input of at least 32x32 works (`size_divisor` 1): odd sizes round up at every stride-2 step.
    """

    size_divisor = 1
    drop_path_per_block = False  # the official recipe: one rate per residual branch (`set_drop_path`)

    def __init__(
        self,
        spec: LowFormerSpec,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        drop_path_skip: int = 0,
        act_layer: type[nn.Module] = nn.Hardswish,
    ) -> None:
        super().__init__()
        if len(spec.stages) != 4:
            raise ValueError(f"LowFormer has four stages, the spec has {len(spec.stages)}")
        self.spec = spec
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.pretrained_cfg = default_cfg(num_classes=num_classes)

        self.stem = Stem(in_chans, spec, act_layer)
        stages, self.feature_info = [], []
        in_chs, reduction = spec.stem_width, 2
        for i, stage_spec in enumerate(spec.stages):
            stages.append(Stage(in_chs, stage_spec, spec, act_layer))
            in_chs, reduction = stage_spec.width, reduction * 2
            self.feature_info.append({"num_chs": in_chs, "reduction": reduction, "module": f"stages.{i}"})
        self.stages = nn.Sequential(*stages)
        self.num_features = in_chs
        self.head_hidden_size = spec.head_widths[1]
        self.head = ClassifierHead(in_chs, spec.head_widths, num_classes, drop_rate, act_layer)

        self.apply(_init_weights)
        if drop_path_rate > 0:
            set_drop_path(self, drop_path_rate, skip=drop_path_skip, per_block=self.drop_path_per_block)

    @torch.jit.ignore
    def reparameterize(self) -> None:
        """Deploy mode in place (see `lowformer.deploy`, which also checks and copies)."""
        reparameterize_model(self, inplace=True)

    # -- timm contract ------------------------------------------------------------------------

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^stem", "blocks": r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.blocks\.(\d+)"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "avg"):
            raise ValueError(f"LowFormer's head pools by average only, got global_pool={global_pool!r}")
        self.num_classes = num_classes
        self.pretrained_cfg = {**self.pretrained_cfg, "num_classes": num_classes}
        ref = self.head.pre_fc.weight
        fc = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        self.head.fc = fc.to(device=ref.device, dtype=ref.dtype)
        _init_weights(self.head.fc)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError unless `x` is (B, C, H, W) with H, W >= 32 (`_layers.check_input`)."""
        check_input(x, self.size_divisor, getattr(self, "variant", "LowFormer"))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs (strides 4, 8, 16, 32) selected by `indices` (timm semantics)."""
        if output_fmt != "NCHW":
            raise ValueError(f"LowFormer features are NCHW only, got output_fmt={output_fmt!r}")
        wanted, max_index = take_indices(len(self.stages), indices)
        self.check_input(x)
        intermediates = []
        x = self.stem(x)
        stages = self.stages[: max_index + 1] if stop_early or intermediates_only else self.stages
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in wanted:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last wanted one (and the head); returns absolute indices."""
        wanted, max_index = take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        self.feature_info = self.feature_info[: max_index + 1]
        if prune_head:
            self.head = nn.Identity()
            self.num_classes = 0
        return wanted


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------------------------
# Checkpoint conversion
# --------------------------------------------------------------------------------------------
#
# Three key layouts describe the same weights:
#   native   stem.conv.conv.weight, stages.2.blocks.0.attn.qkv.weight, head.fc.weight
#   official backbone.input_stem.op_list.0.conv.weight,
#            backbone.stages.2.op_list.1.total.0.0.main.1.pwise.0.weight, head.op_list.3.linear.weight
#            (files saved with the TorchScript head say head.opseq.op_list...)
#   timm     stem.0.conv.weight, stages.2.1.attn.main.1.pwise.weight, classifier.weight
# Official <-> native is a per-module rename that depends on the spec (conv-stage blocks are
# numbered with the downsample first; a LowFormer block's first context branch is nested one
# level deeper when its MLP is present). `key_map` enumerates every pair from the spec, so both
# directions are exact dictionary lookups. timm keys are official keys renamed by fixed rules.


def _conv_bn(dst: str, src: str, bn: bool = True, bias: bool = False) -> list[tuple[str, str]]:
    pairs = weight_bias(f"{dst}.conv", f"{src}.conv", bias=bias)
    return pairs + batchnorm(f"{dst}.norm", f"{src}.norm") if bn else pairs


def _fused_pairs(dst: str, src: str, expand_bias: bool = False) -> list[tuple[str, str]]:
    return _conv_bn(f"{dst}.conv_exp", f"{src}.spatial_conv", bias=expand_bias) + _conv_bn(
        f"{dst}.conv_pwl", f"{src}.point_conv"
    )


def key_map(spec: LowFormerSpec) -> list[tuple[str, str]]:
    """(native key, official key) for every state-dict entry of a model built from `spec`."""
    pairs = _conv_bn("stem.conv", "backbone.input_stem.op_list.0")
    for i in range(spec.stem_depth):
        pairs += _fused_pairs(f"stem.blocks.{i}", f"backbone.input_stem.op_list.{i + 1}.main")
    for s, st in enumerate(spec.stages):
        src = f"backbone.stages.{s}.op_list"
        pairs += _fused_pairs(f"stages.{s}.downsample", f"{src}.0.main")
        if st.kind == "conv":
            for j in range(st.depth - 1):
                pairs += _fused_pairs(f"stages.{s}.blocks.{j}", f"{src}.{j + 1}.main")
            continue
        for j in range(st.depth):
            dst, blk = f"stages.{s}.blocks.{j}", f"{src}.{j + 1}.total"
            if st.attn:
                # official: ResidualBlock(Sequential(GroupNorm, attn)) nested in a Sequential with the
                # MLP when the MLP exists, else a bare ResidualBlock(attn)
                ctx = f"{blk}.0.0.main" if st.mlp else f"{blk}.0.main"
                att = f"{ctx}.1" if st.attn_norm and st.mlp else ctx
                if st.attn_norm and st.mlp:
                    pairs += weight_bias(f"{dst}.norm1", f"{ctx}.0")
                pairs += [(f"{dst}.attn.down.conv.weight", f"{att}.conv_proj.0.weight")]
                pairs += batchnorm(f"{dst}.attn.down.norm", f"{att}.conv_proj.1")
                pairs += [(f"{dst}.attn.qkv.weight", f"{att}.pwise.0.weight")]
                pairs += weight_bias(f"{dst}.attn.up", f"{att}.upsampling")
            if st.mlp:
                mlp = f"{blk}.0.1.main" if st.attn else f"{blk}.0.main"
                pairs += (
                    weight_bias(f"{dst}.norm2", f"{mlp}.0")
                    + weight_bias(f"{dst}.mlp.fc1", f"{mlp}.1")
                    + weight_bias(f"{dst}.mlp.fc2", f"{mlp}.3")
                )
            local = f"{blk}.1.main"
            if st.width < spec.fused_below:
                pairs += _fused_pairs(f"{dst}.local", local, expand_bias=True)
            else:
                pairs += _conv_bn(f"{dst}.local.conv_pw", f"{local}.inverted_conv", bn=False, bias=True)
                pairs += _conv_bn(f"{dst}.local.conv_dw", f"{local}.depth_conv", bn=False, bias=True)
                pairs += _conv_bn(f"{dst}.local.conv_pwl", f"{local}.point_conv")
    pairs += _conv_bn("head.in_conv", "head.op_list.0")
    pairs += [("head.pre_fc.weight", "head.op_list.2.linear.weight")]
    pairs += weight_bias("head.pre_norm", "head.op_list.2.norm")
    pairs += weight_bias("head.fc", "head.op_list.3.linear")
    return pairs


# official -> timm renames (applied in order; longer patterns first where they overlap)
_TIMM_RULES = [
    (r"^backbone\.input_stem\.", "stem."),
    (r"^backbone\.stages\.", "stages."),
    (r"^head\.op_list\.0\.", "in_conv."),
    (r"^head\.op_list\.2\.linear\.", "pre_classifier.0."),
    (r"^head\.op_list\.2\.norm\.", "pre_classifier.1."),
    (r"^head\.op_list\.3\.linear\.", "classifier."),
    (r"\.op_list\.", "."),
    (r"\.total\.0\.0\.", ".attn."),
    (r"\.total\.0\.1\.", ".mlp."),
    (r"\.total\.0\.", ".attn."),
    (r"\.total\.1\.", ".local."),
    (r"\.conv_proj\.0\.", ".conv_proj.conv."),
    (r"\.conv_proj\.1\.", ".conv_proj.norm."),
    (r"\.pwise\.0\.", ".pwise."),
]


def official_to_timm_key(key: str) -> str:
    for pattern, repl in _TIMM_RULES:
        key = re.sub(pattern, repl, key)
    return key


_FORMAT_MARKERS = {
    "native": "stem.conv.conv.weight",
    "official": "backbone.input_stem.op_list.0.conv.weight",
    "timm": "stem.0.conv.weight",
}


def convert_state_dict(state_dict: dict[str, torch.Tensor], spec: LowFormerSpec) -> tuple[dict[str, torch.Tensor], str]:
    """Any known LowFormer layout -> native keys. Returns (state dict, detected format).

    Pure and idempotent: a native dict is returned unchanged. Keys that have no counterpart are
    kept under their original name, so strict loading reports them as unexpected.
    """
    if any(k.startswith("head.opseq.") for k in state_dict):  # official file saved with the TorchScript head
        state_dict = {k.replace("head.opseq.", "head.", 1): v for k, v in state_dict.items()}
    fmt = detect_format(state_dict, _FORMAT_MARKERS)
    if fmt is None:
        raise unknown_layout("LowFormer", _FORMAT_MARKERS)
    if fmt == "native":
        return state_dict, fmt
    to_key = (lambda k: k) if fmt == "official" else official_to_timm_key
    return rename(state_dict, {to_key(official): native for native, official in key_map(spec)}), fmt


def to_official_state_dict(state_dict: dict[str, torch.Tensor], spec: LowFormerSpec) -> dict[str, torch.Tensor]:
    """Native -> official layout (the inverse of `convert_state_dict` for official files)."""
    return rename(state_dict, dict(key_map(spec)))


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------
# Official net_config flags -> spec: fastit -> FusedMBConv everywhere, MLP ratio 4, output
# projection folded into the up-conv; bigit -> downsample expansion 6; huge_model -> stem
# expansion 4; bighead -> head (2304, 2560); noattention -> attn=False; mlpremoved -> mlp=False
# (and, as a side effect in the official code, no GroupNorm before the attention).
# The first attention stage attends at stride 2, the last at stride 1.

_OFFICIAL_NAMES = {
    "lowformer_b0": "b0",
    "lowformer_b1": "b1",
    "lowformer_b15": "b15",
    "lowformer_b3": "b3",
    "lowformer_e1": "E1",
    "lowformer_e2": "E2",
    "lowformer_e3": "E3",
}


def _spec(
    widths: tuple[int, ...],
    depths: tuple[int, ...],
    down_expand: float = 6.0,
    stem_expand: float = 2.0,
    attn: bool = True,
    mlp: bool = True,
    head_widths: tuple[int, int] = (1536, 1600),
) -> LowFormerSpec:
    conv = [StageSpec(w, d, "conv", down_expand) for w, d in zip(widths[1:3], depths[1:3])]
    att = [
        StageSpec(w, d, "attention", down_expand, attn=attn, attn_norm=mlp, attn_stride=stride, mlp=mlp)
        for w, d, stride in zip(widths[3:], depths[3:], (2, 1))
    ]
    return LowFormerSpec(
        stem_width=widths[0],
        stem_depth=depths[0],
        stem_expand=stem_expand,
        stages=tuple(conv + att),
        head_widths=head_widths,
    )


SPECS: dict[str, LowFormerSpec] = {
    "lowformer_b0": _spec((16, 32, 64, 128, 256), (0, 1, 1, 3, 4), down_expand=4.0),
    "lowformer_b1": _spec((16, 32, 64, 128, 256), (0, 1, 1, 5, 5)),
    "lowformer_b15": _spec((20, 40, 80, 160, 320), (0, 1, 1, 6, 6), head_widths=(2304, 2560)),
    "lowformer_b3": _spec((32, 64, 128, 256, 512), (1, 2, 3, 6, 6), stem_expand=4.0),
    "lowformer_e1": _spec((20, 40, 80, 160, 320), (0, 1, 1, 4, 4), attn=False, mlp=False, head_widths=(2304, 2560)),
    "lowformer_e2": _spec((32, 64, 128, 256, 512), (1, 2, 3, 4, 4), stem_expand=4.0, attn=False, mlp=False),
    "lowformer_e3": _spec((32, 64, 128, 256, 512), (1, 2, 3, 6, 6), stem_expand=4.0, mlp=False),
}

_PAPER = {  # name: (params M, MACs M) as published (README / paper tables)
    "lowformer_b0": (14.1, 944),
    "lowformer_b1": (17.9, 1410),
    "lowformer_b15": (33.9, 2573),
    "lowformer_b3": (57.1, 6098),
    "lowformer_e1": (None, 1350),
    "lowformer_e2": (None, 3800),
    "lowformer_e3": (None, 5350),
}


def _official_release(name: str) -> dict:
    short = _OFFICIAL_NAMES[name]
    return {
        "file": "evalmodel.pt",
        "paths": [
            f"{name}.pt",
            f"{name}.safetensors",
            f"{name}/evalmodel.pt",
            f".exp/cls/imagenet/{short}/checkpoint/evalmodel.pt",
        ],
        "source": (
            "the official LowFormer checkpoint folder linked from the README of "
            f"https://github.com/altair199797/LowFormer (file .exp/cls/imagenet/{short}/checkpoint/evalmodel.pt), "
            f"or timm's weights 'timm/{name}.in1k' (model.safetensors, timm layout)"
        ),
    }


for _name in SPECS:
    register_model(
        _name,
        functools.partial(LowFormer, SPECS[_name]),
        family="lowformer",
        spec=SPECS[_name],
        paper=_PAPER[_name],
        pretrained=_official_release(_name),
        convert=convert_state_dict,
    )

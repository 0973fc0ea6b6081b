"""EdgeViT: light-weight vision transformers with a local-global-local bottleneck.

- "EdgeViTs: Competing Light-weight CNNs on Mobile Devices with Vision Transformers", Pan, Bulat,
  Tan, Zhu, Dudziak, Li, Tzimiropoulos, Martinez, ECCV 2022, arXiv:2205.03436.
- Official code: github.com/saic-fi/edgevit, `src/edgevit.py` (Apache-2.0). This is an
  independent implementation that reproduces the official model exactly (same parameters, same
  function) and loads its state dicts. Unlike the official code it runs at any input size that is
  a multiple of 32, resets its classifier correctly, and has the timm feature contract.
- The authors released no trained weights.

Layout of this file: blocks -> stage -> model -> metadata -> checkpoint conversion -> presets.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm2d, Mlp, trunc_normal_
from timm.models._manipulate import checkpoint_seq, reparameterize_model
from torch import nn

from ._keymap import batchnorm, detect_format, rename, unknown_layout, weight_bias
from ._layers import affine_free, check_input, fold_affine_into_next, set_drop_path, take_indices
from ._registry import register_model

__all__ = [
    "EdgeViT",
    "EdgeViTSpec",
    "EdgeViTStageSpec",
    "GlobalSparseAttention",
    "convert_state_dict",
    "to_official_state_dict",
]


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Downsampling by non-overlapping patches: k x k conv with stride k, then LayerNorm over channels."""

    def __init__(self, in_chs: int, out_chs: int, patch_size: int, drop: float = 0.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, patch_size, stride=patch_size)
        # NOTE: eps 1e-5 (PyTorch's default) here, 1e-6 in the blocks' LayerNorms, as in the official code
        self.norm = LayerNorm2d(out_chs, eps=1e-5)
        # the official `pos_drop` follows the first patch embedding; later stages pass drop=0
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.norm(self.conv(x)))


class LocalAggregation(nn.Module):
    """The first "L": conditional position encoding, then a conv token mixer and a conv MLP.

    x + CPE(x) -> x + [1x1 conv -> k x k depthwise conv -> 1x1 conv](BN(x)) -> x + MLP(BN(x)),
    with the position encoding a 3x3 depthwise conv and the MLP two 1x1 convs.
    NOTE: the official code names the depthwise conv `attn`; it is a plain convolution.
    """

    drop_path_attrs = ("drop_path1", "drop_path2")

    def __init__(
        self,
        dim: int,
        mlp_ratio: float = 4.0,
        kernel_size: int = 5,
        act_layer: type[nn.Module] = nn.GELU,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.BatchNorm2d(dim)
        self.conv_in = nn.Conv2d(dim, dim, 1)
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.conv_out = nn.Conv2d(dim, dim, 1)
        self.drop_path1 = nn.Identity()
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, use_conv=True)
        self.drop_path2 = nn.Identity()

    def reparameterize(self) -> None:
        """Deploy mode: fold both BatchNorms into the 1x1 convs after them (exact)."""
        if not isinstance(self.norm1, nn.Identity):
            self.conv_in = fold_affine_into_next(self.norm1, self.conv_in)
            self.mlp.fc1 = fold_affine_into_next(self.norm2, self.mlp.fc1)
            self.norm1, self.norm2 = affine_free(self.norm1), affine_free(self.norm2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        x = x + self.drop_path1(self.conv_out(self.conv_dw(self.conv_in(self.norm1(x)))))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class CellSpread(nn.Module):
    """Deploy form of a depthwise transposed conv whose kernel equals its stride r: every input pixel
    becomes one r x r cell, out[c, r*i + a, r*j + b] = x[c, i, j] * w[c, a, b] + bias[c].

    The cells do not overlap, so this broadcast product is the transposed conv's function without a
    convolution (each output is one product plus the bias, as in the conv); a compiled graph fuses it
    with the LayerNorm that follows, where the conv is a separate kernel that oneDNN cannot pack
    (depthwise transposed). Same parameters and state-dict keys as the conv (`weight` (C, 1, r, r),
    `bias` (C,)). It takes and returns (B, C, H, W) in any memory format and computes channels-last.
    """

    def __init__(self, conv: nn.ConvTranspose2d) -> None:
        super().__init__()
        c = conv.in_channels
        if not (
            conv.groups == c == conv.out_channels
            and conv.kernel_size == conv.stride
            and conv.padding == (0, 0)
            and conv.output_padding == (0, 0)
            and conv.dilation == (1, 1)
        ):
            raise ValueError(
                f"only a depthwise transposed conv with kernel = stride and no padding spreads cells: {conv}"
            )
        self.stride = conv.stride
        self.weight = conv.weight
        self.bias = conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, h, w = x.shape
        rh, rw = self.stride
        cell = self.weight.reshape(C, rh, rw).permute(1, 2, 0)  # (rh, rw, C)
        out = x.permute(0, 2, 3, 1)[:, :, None, :, None, :] * cell[None, None, :, None, :, :]  # (B, h, rh, w, rw, C)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(B, h * rh, w * rw, C).permute(0, 3, 1, 2)


class GlobalSparseAttention(nn.Module):
    """The "G" and the second "L": attention among delegate tokens, propagated back to the grid.

    On a channels-last map (B, H, W, C): keep every `stride`-th token of every `stride`-th row (the
    paper's delegates, sub-sampling rate r) -> multi-head self-attention among them -> depthwise
    transposed conv (kernel = stride = r) that spreads each delegate back over its r x r cell ->
    LayerNorm -> output projection. With stride 1 it is plain multi-head self-attention.

    NOTE: the official code sub-samples with `AvgPool2d(kernel_size=1, stride=r)`, which is the
    strided slice used here. H and W must be multiples of `stride` so the transposed conv restores
    the grid exactly.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        stride: int = 1,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.stride = stride
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        if stride > 1:
            self.local_prop = nn.ConvTranspose2d(dim, dim, stride, stride=stride, groups=dim)
            self.norm = nn.LayerNorm(dim)  # NOTE: eps 1e-5, as in the official code
        else:
            self.local_prop = nn.Identity()
            self.norm = nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def reparameterize(self) -> None:
        """Deploy mode: fold the LayerNorm affine into the output projection, and run the delegates'
        spread as the broadcast product it is (`CellSpread`). Both exact."""
        if getattr(self.norm, "elementwise_affine", False):
            self.proj = fold_affine_into_next(self.norm, self.proj)
            self.norm = affine_free(self.norm)
        if isinstance(self.local_prop, nn.ConvTranspose2d):
            self.local_prop = CellSpread(self.local_prop).train(self.local_prop.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :: self.stride, :: self.stride]  # (B, H/r, W/r, C)
        B, h, w, C = x.shape
        qkv = self.qkv(x).reshape(B, h * w, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, hw, head_dim) each
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, h, w, C)
        if self.stride > 1:
            x = self.local_prop(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, H, W, C)
            x = self.norm(x)
        return self.proj_drop(self.proj(x))


class LGLBlock(nn.Module):
    """Local-global-local block: [local aggregation] -> x + CPE(x) -> x + attn(LN(x)) -> x + MLP(LN(x)).

    Input and output are NCHW; the attention half runs channels-last, where its linear layers act
    on the channel axis. The stochastic-depth rate is shared by all residual branches of the block
    (the local aggregation's included), as in the official code (`EdgeViT.drop_path_per_block`).
    """

    drop_path_attrs = ("drop_path1", "drop_path2")

    def __init__(
        self,
        dim: int,
        num_heads: int,
        attn_stride: int = 1,
        local_agg: bool = True,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        act_layer: type[nn.Module] = nn.GELU,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if local_agg:
            self.local_agg = LocalAggregation(dim, mlp_ratio, act_layer=act_layer, proj_drop=proj_drop)
        else:
            self.local_agg = nn.Identity()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = GlobalSparseAttention(dim, num_heads, attn_stride, qkv_bias, attn_drop, proj_drop)
        self.drop_path1 = nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = nn.Identity()

    def reparameterize(self) -> None:
        """Deploy mode: fold the LayerNorm affines into qkv and the first MLP layer (exact: the
        delegate sub-sampling between norm1 and qkv picks tokens and commutes with a per-channel affine)."""
        if self.norm1.elementwise_affine:
            self.attn.qkv = fold_affine_into_next(self.norm1, self.attn.qkv)
            self.mlp.fc1 = fold_affine_into_next(self.norm2, self.mlp.fc1)
            self.norm1, self.norm2 = affine_free(self.norm1), affine_free(self.norm2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.local_agg(x)
        x = x + self.pos_embed(x)
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        # (B, C, H, W), back to standard memory layout so every stage output is plain NCHW
        return x.permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EdgeViTStageSpec:
    """One stage: a patch-embedding downsample, then `depth` LGL blocks.

    Attributes:
        width: channels of the stage.
        depth: LGL blocks after the downsample.
        num_heads: attention heads (head width = width / num_heads).
        patch_size: kernel and stride of the patch-embedding conv that opens the stage.
        attn_stride: the paper's sub-sampling rate r: attention runs among every r-th token in
            each direction and a transposed conv propagates it back; 1 is full self-attention.
        local_agg: whether each block opens with a local aggregation (official: where r > 1).
        mlp_ratio: hidden width of the MLPs, as a multiple of `width`.
    """

    width: int
    depth: int
    num_heads: int
    patch_size: int = 2
    attn_stride: int = 1
    local_agg: bool = True
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        if self.width <= 0 or self.depth < 0:
            raise ValueError(f"EdgeViTStageSpec needs width > 0 and depth >= 0, got {self.width}, {self.depth}")
        if self.num_heads <= 0 or self.width % self.num_heads:
            raise ValueError(f"EdgeViTStageSpec.num_heads={self.num_heads} must divide width={self.width}")
        if self.patch_size < 1 or self.attn_stride < 1:
            raise ValueError(
                "EdgeViTStageSpec needs patch_size >= 1 and attn_stride >= 1, "
                f"got {self.patch_size}, {self.attn_stride}"
            )


@dataclass(frozen=True)
class EdgeViTSpec:
    """The whole architecture as data: a preset is one of these, a new variant is another.

    Attributes:
        stages: the stages, in order; the output of the last feeds the head.
        qkv_bias: bias in the attention's q, k, v projection.
    """

    stages: tuple[EdgeViTStageSpec, ...]
    qkv_bias: bool = True

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("EdgeViTSpec needs at least one stage")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EdgeViTSpec:
        d = dict(d)
        d["stages"] = tuple(EdgeViTStageSpec(**s) for s in d["stages"])
        return cls(**d)


def input_size_divisor(spec: EdgeViTSpec) -> int:
    """Input height and width must be multiples of this (32 for the presets).

    Stage i sees the input reduced by the product r_i of the patch sizes so far; its patch conv
    needs the grid divisible exactly and its attention needs the reduced grid divisible by
    `attn_stride`. So the input must be a multiple of r_i * attn_stride_i for every stage.
    """
    divisor, reduction = 1, 1
    for stage in spec.stages:
        reduction *= stage.patch_size
        divisor = math.lcm(divisor, reduction * stage.attn_stride)
    return divisor


class EdgeViTStage(nn.Module):
    def __init__(
        self,
        in_chs: int,
        spec: EdgeViTStageSpec,
        qkv_bias: bool = True,
        act_layer: type[nn.Module] = nn.GELU,
        embed_drop: float = 0.0,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.downsample = PatchEmbed(in_chs, spec.width, spec.patch_size, drop=embed_drop)
        self.blocks = nn.Sequential(
            *[
                LGLBlock(
                    spec.width,
                    spec.num_heads,
                    attn_stride=spec.attn_stride,
                    local_agg=spec.local_agg,
                    mlp_ratio=spec.mlp_ratio,
                    qkv_bias=qkv_bias,
                    act_layer=act_layer,
                    proj_drop=proj_drop,
                    attn_drop=attn_drop,
                )
                for _ in range(spec.depth)
            ]
        )
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class ClassifierHead(nn.Module):
    """BatchNorm on the last feature map -> global average pool -> dropout -> linear.

    NOTE: the official code applies this BatchNorm at the end of `forward_features`; here it
    opens the head (as timm's ConvNeXt keeps its final norm in the head), so the features and
    the last intermediate are the same tensor, and a detector gets the raw last-stage map like
    the earlier ones.
    """

    def __init__(self, in_chs: int, num_classes: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_chs)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_chs, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.norm(x).mean((2, 3)))
        return x if pre_logits else self.fc(x)


class EdgeViT(nn.Module):
    """EdgeViT classifier built from an `EdgeViTSpec`, with timm's model contract.

    stages (patch embedding + LGL blocks each) -> BatchNorm -> global average pool -> linear.

    Args:
        spec: the architecture.
        num_classes: classifier outputs; 0 gives pooled features.
        in_chans: input channels.
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout in the MLPs, after the attention projection and after the first
            patch embedding (the official code's `drop_rate`).
        attn_drop_rate: dropout on the attention weights.
        drop_path_rate: stochastic depth, rising linearly over the blocks from 0 for the first to
            `drop_path_rate` for the last, each block's rate shared by all its residual branches
            (the official / DeiT schedule: `set_drop_path` with `per_block=True`).
        act_layer: activation of the MLPs.
    """

    drop_path_per_block = True

    def __init__(
        self,
        spec: EdgeViTSpec,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.size_divisor = input_size_divisor(spec)
        self.grad_checkpointing = False
        self.pretrained_cfg = default_cfg(num_classes=num_classes)

        stages, self.feature_info = [], []
        in_chs, reduction = in_chans, 1
        for i, stage_spec in enumerate(spec.stages):
            stages.append(
                EdgeViTStage(
                    in_chs,
                    stage_spec,
                    qkv_bias=spec.qkv_bias,
                    act_layer=act_layer,
                    embed_drop=proj_drop_rate if i == 0 else 0.0,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                )
            )
            in_chs, reduction = stage_spec.width, reduction * stage_spec.patch_size
            self.feature_info.append({"num_chs": in_chs, "reduction": reduction, "module": f"stages.{i}"})
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = in_chs
        self.head = ClassifierHead(in_chs, num_classes, drop_rate)

        self.apply(_init_weights)
        if drop_path_rate > 0:
            set_drop_path(self, drop_path_rate, per_block=self.drop_path_per_block)

    @torch.jit.ignore
    def reparameterize(self) -> None:
        """Deploy mode in place (see `lowformer.deploy`, which also checks and copies)."""
        reparameterize_model(self, inplace=True)

    # -- timm contract ------------------------------------------------------------------------

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return {
            "stem": r"^stages\.0\.downsample",
            "blocks": r"^stages\.(\d+)"
            if coarse
            else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
            ],
        }

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New linear classifier of `num_classes` outputs (0: none) on the pooled features.

        NOTE: the official `reset_classifier` builds `nn.Linear(self.embed_dim, ...)` from the list
        of stage widths and raises a TypeError; this sizes it from the last stage.
        """
        if global_pool not in (None, "avg"):
            raise ValueError(f"EdgeViT's head pools by average only, got global_pool={global_pool!r}")
        self.num_classes = num_classes
        self.pretrained_cfg = {**self.pretrained_cfg, "num_classes": num_classes}
        ref = self.head.norm.weight
        fc = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        self.head.fc = fc.to(device=ref.device, dtype=ref.dtype)
        _init_weights(self.head.fc)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError unless `x` is (B, C, H, W) with H, W >= 32 and multiples of `size_divisor`:
        every patch embedding and every attention sub-sampling must divide the token grid exactly."""
        check_input(x, self.size_divisor, getattr(self, "variant", "EdgeViT"))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.stages(x)

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
        """Stage outputs (strides 4, 8, 16, 32 for the presets) selected by `indices` (timm semantics).

        `norm` is accepted for timm compatibility and has no effect: the only norm after the
        stages belongs to the classifier head.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"EdgeViT features are NCHW only, got output_fmt={output_fmt!r}")
        wanted, max_index = take_indices(len(self.stages), indices)
        self.check_input(x)
        intermediates = []
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
        # the head is sized for the last stage: it goes with it even when prune_head is False
        if prune_head or max_index < len(self.stages) - 1:
            self.head = nn.Identity()
            self.num_classes = 0
        self.stages = self.stages[: max_index + 1]
        self.feature_info = self.feature_info[: max_index + 1]
        return wanted


def _init_weights(module: nn.Module) -> None:
    # as the official code: truncated-normal linear weights, zero biases; convs keep PyTorch's init
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------


def default_cfg(**kwargs) -> dict:
    """Data config in timm's `pretrained_cfg` convention (timm.data.resolve_data_config reads it).

    The official training is DeiT's: ImageNet mean/std, bicubic, and at evaluation a resize to
    256/224 of the crop then a centre crop, i.e. crop_pct 0.875. (The official factories attach
    timm's `_cfg()`, whose crop_pct 0.9 their own evaluation does not use.)
    """
    return {
        "input_size": (3, 224, 224),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "num_classes": 1000,
        "first_conv": "stages.0.downsample.conv",
        "classifier": "head.fc",
        **kwargs,
    }


# --------------------------------------------------------------------------------------------
# Checkpoint conversion
# --------------------------------------------------------------------------------------------
#
# Two key layouts describe the same weights:
#   native   stages.0.downsample.conv.weight, stages.2.blocks.1.local_agg.conv_dw.weight,
#            stages.2.blocks.1.attn.local_prop.weight, head.norm.running_var, head.fc.weight
#   official patch_embed1.proj.weight, blocks3.1.LocalAgg.attn.weight,
#            blocks3.1.SelfAttn.attn.LocalProp.weight, norm.running_var, head.weight
# The official training script saves {"model": state_dict, "optimizer": ..., ...}; the
# checkpoint reader unwraps it, so conversion sees a bare state dict either way. Every tensor
# keeps its shape; only names change. `key_map` enumerates every pair from the spec, so both
# directions are exact dictionary lookups.


def key_map(spec: EdgeViTSpec) -> list[tuple[str, str]]:
    """(native key, official key) for every state-dict entry of a model built from `spec`."""
    pairs = []
    for s, st in enumerate(spec.stages):
        dst, src = f"stages.{s}", f"patch_embed{s + 1}"
        pairs += weight_bias(f"{dst}.downsample.conv", f"{src}.proj") + weight_bias(
            f"{dst}.downsample.norm", f"{src}.norm"
        )
        for j in range(st.depth):
            dst, src = f"stages.{s}.blocks.{j}", f"blocks{s + 1}.{j}"
            if st.local_agg:
                la, ola = f"{dst}.local_agg", f"{src}.LocalAgg"
                pairs += weight_bias(f"{la}.pos_embed", f"{ola}.pos_embed") + batchnorm(f"{la}.norm1", f"{ola}.norm1")
                pairs += weight_bias(f"{la}.conv_in", f"{ola}.conv1") + weight_bias(f"{la}.conv_dw", f"{ola}.attn")
                pairs += weight_bias(f"{la}.conv_out", f"{ola}.conv2") + batchnorm(f"{la}.norm2", f"{ola}.norm2")
                pairs += weight_bias(f"{la}.mlp.fc1", f"{ola}.mlp.fc1") + weight_bias(f"{la}.mlp.fc2", f"{ola}.mlp.fc2")
            sa = f"{src}.SelfAttn"
            pairs += weight_bias(f"{dst}.pos_embed", f"{sa}.pos_embed") + weight_bias(f"{dst}.norm1", f"{sa}.norm1")
            pairs += weight_bias(f"{dst}.attn.qkv", f"{sa}.attn.qkv", bias=spec.qkv_bias)
            if st.attn_stride > 1:
                pairs += weight_bias(f"{dst}.attn.local_prop", f"{sa}.attn.LocalProp")
                pairs += weight_bias(f"{dst}.attn.norm", f"{sa}.attn.norm")
            pairs += weight_bias(f"{dst}.attn.proj", f"{sa}.attn.proj") + weight_bias(f"{dst}.norm2", f"{sa}.norm2")
            pairs += weight_bias(f"{dst}.mlp.fc1", f"{sa}.mlp.fc1") + weight_bias(f"{dst}.mlp.fc2", f"{sa}.mlp.fc2")
    pairs += batchnorm("head.norm", "norm") + weight_bias("head.fc", "head")
    return pairs


_FORMAT_MARKERS = {
    "native": "stages.0.downsample.conv.weight",
    "official": "patch_embed1.proj.weight",
}


def convert_state_dict(state_dict: dict[str, torch.Tensor], spec: EdgeViTSpec) -> tuple[dict[str, torch.Tensor], str]:
    """Any known EdgeViT layout -> native keys. Returns (state dict, detected format).

    Pure and idempotent: a native dict is returned unchanged. Keys that have no counterpart are
    kept under their original name, so strict loading reports them as unexpected.
    """
    fmt = detect_format(state_dict, _FORMAT_MARKERS)
    if fmt is None:
        raise unknown_layout("EdgeViT", _FORMAT_MARKERS)
    if fmt == "native":
        return state_dict, fmt
    return rename(state_dict, {official: native for native, official in key_map(spec)}), fmt


def to_official_state_dict(state_dict: dict[str, torch.Tensor], spec: EdgeViTSpec) -> dict[str, torch.Tensor]:
    """Native -> official layout (the inverse of `convert_state_dict` for official files)."""
    return rename(state_dict, dict(key_map(spec)))


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------
# Official `EdgeVit(depth, embed_dim, head_dim, sr_ratios)` -> spec: num_heads = width // head_dim,
# patch sizes (4, 2, 2, 2), sub-sampling rates r = (4, 2, 2, 1), local aggregation where r > 1,
# MLP ratio 4, qkv bias. The depths are those of the released code; for EdgeViT-S they give more
# parameters than the paper states (docs/edgevit.md).

_PATCH_SIZES = (4, 2, 2, 2)
_ATTN_STRIDES = (4, 2, 2, 1)


def _spec(widths: tuple[int, ...], depths: tuple[int, ...], head_dim: int) -> EdgeViTSpec:
    return EdgeViTSpec(
        stages=tuple(
            EdgeViTStageSpec(w, d, num_heads=w // head_dim, patch_size=p, attn_stride=r, local_agg=r > 1)
            for w, d, p, r in zip(widths, depths, _PATCH_SIZES, _ATTN_STRIDES, strict=True)
        )
    )


SPECS: dict[str, EdgeViTSpec] = {
    "edgevit_xxs": _spec((36, 72, 144, 288), (1, 1, 3, 2), head_dim=36),
    "edgevit_xs": _spec((48, 96, 240, 384), (1, 1, 3, 1), head_dim=48),
    "edgevit_s": _spec((48, 96, 240, 384), (1, 2, 5, 3), head_dim=48),
}

_PAPER = {  # name: (params M, MACs M) as published (arXiv:2205.03436, ImageNet table)
    "edgevit_xxs": (4.1, 600),
    "edgevit_xs": (6.7, 1100),
    "edgevit_s": (11.1, 1900),
}

_NO_WEIGHTS = (
    "the EdgeViT authors have not released trained weights (github.com/saic-fi/edgevit ships code only; "
    "its factories default to pretrained=True but load nothing). Train the model, or load your own "
    "checkpoint (official or native layout) with checkpoint_path=..."
)


for _name in SPECS:
    register_model(
        _name,
        functools.partial(EdgeViT, SPECS[_name]),
        family="edgevit",
        spec=SPECS[_name],
        paper=_PAPER[_name],
        pretrained={"none": _NO_WEIGHTS},
        convert=convert_state_dict,
        classifier="head.fc",
        size_divisor=input_size_divisor(SPECS[_name]),
    )

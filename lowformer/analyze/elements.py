"""Design elements whose MACs and measured time are compared: the built-in pairs and the registry.

A *pair* names two or more ways (*sides*) to do the same job in a network, e.g. a fused against an
unfused MBConv. Each side is built at a (channels, resolution) cell of a grid and receives a
(batch, channels, resolution, resolution) input. The first side is the reference ("a"); every
other side is compared with it, so a pair of three sides gives two comparisons per cell (b vs a,
c vs a). Ratios are always first side over other side: `time_ratio = time(a) / time(b)`, `mac_ratio
= macs(a) / macs(b)`; below 1 means the first side is cheaper.

Registering a pair takes a few lines:

    from torch import nn
    from lowformer.analyze import ElementPair, Side, register_pair

    register_pair(ElementPair(
        "silu-vs-relu",
        sides=(Side("silu", lambda c, r: nn.Sequential(nn.Conv2d(c, c, 1), nn.SiLU())),
               Side("relu", lambda c, r: nn.Sequential(nn.Conv2d(c, c, 1), nn.ReLU()))),
        description="1x1 conv + SiLU vs 1x1 conv + ReLU",
    ))

The built-in pairs use the library's own blocks (`lowformer.models.lowformer`) where they exist, so
the sweep measures what the models run.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.layers import GroupNorm1, LayerNorm2d
from torch import nn

from ..models.lowformer import FusedMBConv, LowFormerBlock, Lowtention, MBConv

__all__ = [
    "ElementPair",
    "MultiHeadSelfAttention",
    "Side",
    "get_pair",
    "list_pairs",
    "register_pair",
    "resolve_pairs",
    "unregister_pair",
]

MIN_CHANNELS = 8
MIN_RESOLUTION = 4

Builder = Callable[[int, int], nn.Module]


@dataclass(frozen=True)
class Side:
    """One way to build an element: `build(channels, resolution)` returns the module to time.

    Its input is (batch, channels, resolution, resolution). The output shape is free (an
    upsampler doubles the resolution), but every side of a pair should do the same job.
    """

    label: str
    build: Builder
    description: str = ""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", self.label):
            raise ValueError(f"side label {self.label!r}: use letters, digits and _ . + - (no spaces)")
        if not callable(self.build):
            raise TypeError(f"side {self.label!r}: build must be callable (channels, resolution) -> nn.Module")


@dataclass(frozen=True)
class ElementPair:
    """Two or more sides compared cell by cell; the first side is the reference ("a").

    Attributes:
        name: the CLI name (lowercase letters, digits and dashes).
        sides: the ways to build the element; ratios are first side / other side.
        description: one line for `lowformer analyze --list` and the report.
        claim: what the papers say about this pair, quoted in the report beside the measurement.
        version: bump it when a side's forward changes but its modules do not, so cached cells
            are measured again (module structure is part of the cache key already).
        check: optional `(channels, resolution) -> reason or None`; a cell with a reason is skipped.
    """

    name: str
    sides: tuple[Side, ...]
    description: str
    claim: str = ""
    version: str = "1"
    check: Callable[[int, int], str | None] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", self.name):
            raise ValueError(f"pair name {self.name!r}: use lowercase letters, digits and dashes")
        object.__setattr__(self, "sides", tuple(self.sides))
        if len(self.sides) < 2:
            raise ValueError(f"pair {self.name!r} needs at least two sides, got {len(self.sides)}")
        if not all(isinstance(s, Side) for s in self.sides):
            raise TypeError(f"pair {self.name!r}: sides must be Side objects")
        labels = [s.label for s in self.sides]
        if len(set(labels)) != len(labels):
            raise ValueError(f"pair {self.name!r}: side labels must differ, got {labels}")

    @property
    def labels(self) -> list[str]:
        return [s.label for s in self.sides]

    def comparisons(self) -> list[tuple[Side, Side]]:
        """(reference, other) for every side after the first."""
        return [(self.sides[0], s) for s in self.sides[1:]]

    def skip_reason(self, channels: int, resolution: int) -> str | None:
        return self.check(channels, resolution) if self.check is not None else None


_PAIRS: dict[str, ElementPair] = {}


def register_pair(pair: ElementPair, *, replace: bool = False) -> ElementPair:
    """Add `pair` to the registry (the CLI and `analyze_elements` find it by name). Returns it."""
    if not isinstance(pair, ElementPair):
        raise TypeError(f"register_pair takes an ElementPair, got {type(pair).__name__}")
    if pair.name in _PAIRS and not replace:
        raise ValueError(f"pair {pair.name!r} is already registered (pass replace=True to replace it)")
    _PAIRS[pair.name] = pair
    return pair


def unregister_pair(name: str) -> None:
    """Remove a registered pair (tests and notebooks that redefine one)."""
    _PAIRS.pop(name, None)


def list_pairs() -> list[str]:
    """Registered pair names, built-in ones first, in registration order."""
    return list(_PAIRS)


def get_pair(name: str) -> ElementPair:
    """The registered pair `name`; an unknown name raises ValueError with close matches."""
    try:
        return _PAIRS[name]
    except KeyError:
        pass
    close = difflib.get_close_matches(name, list(_PAIRS), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown pair {name!r}.{hint} Registered pairs: {', '.join(_PAIRS)}")


def resolve_pairs(pairs: Sequence[str | ElementPair] | None) -> list[ElementPair]:
    """Names or pair objects -> pairs, without repeats; None means every registered pair."""
    if pairs is None:
        return list(_PAIRS.values())
    out: dict[str, ElementPair] = {}
    for p in pairs:
        pair = p if isinstance(p, ElementPair) else get_pair(p)
        out.setdefault(pair.name, pair)
    if not out:
        raise ValueError("no pairs to analyse")
    return list(out.values())


# --------------------------------------------------------------------------------------------
# Elements the library does not have as blocks
# --------------------------------------------------------------------------------------------


def mhsa_heads(dim: int, head_dim: int = 32) -> int:
    """Heads of a standard ViT attention on `dim` channels: `dim // head_dim`, at least one, and a
    divisor of `dim` (narrow or odd widths get fewer, wider heads)."""
    heads = max(1, dim // head_dim)
    while dim % heads:
        heads -= 1
    return heads


class MultiHeadSelfAttention(nn.Module):
    """Standard multi-head self-attention over all H*W positions of a (B, C, H, W) map.

    1x1 conv to q, k, v (C channels each), scaled dot-product attention per head, 1x1 output
    projection: ViT's attention, laid out on a feature map so that it replaces Lowtention in place.
    Unlike Lowtention it attends at full resolution and full width.
    """

    def __init__(self, dim: int, head_dim: int = 32) -> None:
        super().__init__()
        self.num_heads = mhsa_heads(dim, head_dim)
        self.head_dim = dim // self.num_heads
        self.qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(x).reshape(B, 3, self.num_heads, self.head_dim, H * W).transpose(-1, -2)
        q, k, v = qkv.unbind(1)  # each (B, heads, H*W, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(-1, -2).reshape(B, C, H, W))


class Interpolate(nn.Module):
    """Fixed-factor interpolation (`F.interpolate`), as a module."""

    def __init__(self, scale_factor: int = 2, mode: str = "bilinear") -> None:
        super().__init__()
        self.scale_factor = scale_factor
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.scale_factor, mode=self.mode, align_corners=False)

    def extra_repr(self) -> str:
        return f"scale_factor={self.scale_factor}, mode={self.mode!r}"


# --------------------------------------------------------------------------------------------
# Built-in pairs
# --------------------------------------------------------------------------------------------


def _lowformer_block(dim: int, attention: str) -> LowFormerBlock:
    """A LowFormer block without MLP (the E3 layout): x + attn(GN(x)), then the local FusedMBConv.

    attention: "lowtention" (stride 2, as in the first attention stage), "mhsa" (the same block
    around standard full-resolution attention) or "none" (the local block alone, as in E1/E2).
    """
    if attention == "none":
        return LowFormerBlock(dim, attn=False, mlp=False)
    block = LowFormerBlock(dim, attn=True, attn_stride=2, mlp=False)
    if attention == "mhsa":
        block.attn = MultiHeadSelfAttention(dim)  # same norm, residual and local block around it
    return block


def _conv1x1(channels: int, tail: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), tail)


BUILTIN_PAIRS: tuple[ElementPair, ...] = (
    ElementPair(
        "fused-mbconv",
        sides=(
            Side("fused", lambda c, r: FusedMBConv(c, c, expand_ratio=4.0), "3x3 conv C->4C (BN, act), 1x1 4C->C"),
            Side("unfused", lambda c, r: MBConv(c, expand_ratio=4.0), "1x1 C->4C, 3x3 depthwise 4C, 1x1 4C->C"),
        ),
        description="fused MBConv vs MBConv (inverted residual), expansion 4",
        claim="The fused block always has more MACs (4-5x at expansion 4), yet the papers measure it faster in many "
        "configurations, mostly at high resolution and few channels (early stages); LowFormer uses fused MBConvs "
        "in its conv stages and below 256 channels.",
    ),
    ElementPair(
        "depthwise-conv",
        sides=(
            Side("depthwise", lambda c, r: nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), "3x3, groups=C"),
            Side("dense", lambda c, r: nn.Conv2d(c, c, 3, padding=1, bias=False), "3x3, groups=1"),
        ),
        description="3x3 depthwise conv vs 3x3 dense conv, C->C",
        claim="A depthwise conv has C times fewer MACs than a dense one, but it is memory-bound: its time falls far "
        "less than its MACs.",
    ),
    ElementPair(
        "lowtention",
        sides=(
            Side(
                "lowtention",
                lambda c, r: _lowformer_block(c, "lowtention"),
                "LowFormer block (no MLP): GN, Lowtention at stride 2, local FusedMBConv",
            ),
            Side(
                "mhsa",
                lambda c, r: _lowformer_block(c, "mhsa"),
                "same block with standard multi-head self-attention at full resolution and width",
            ),
            Side("none", lambda c, r: _lowformer_block(c, "none"), "same block without attention (E1/E2 layout)"),
        ),
        description="LowFormer block with Lowtention vs with standard MHSA at full resolution vs without attention",
        claim="The journal paper drops self-attention in E1/E2 as expensive in practice despite a low MAC "
        "footprint; Lowtention (attention on a downsampled, half-width map) is the WACV paper's way to cut that "
        "cost. Standard MHSA at full resolution grows with the square of the token count.",
    ),
    ElementPair(
        "attention-stride",
        sides=(
            Side("stride2", lambda c, r: Lowtention(c, stride=2), "Lowtention attending at H/2 x W/2 (5x5 dw down)"),
            Side("stride1", lambda c, r: Lowtention(c, stride=1), "Lowtention attending at H x W (3x3 dw)"),
        ),
        description="Lowtention with attention stride 2 vs stride 1",
        claim="Lowtention attends on a downsampled map to save time (WACV paper); LowFormer attends at stride 2 in "
        "its first attention stage and at stride 1 in its last. MACs predict a saving that grows with resolution "
        "(4x fewer tokens, a 16x smaller attention matrix).",
    ),
    ElementPair(
        "norm",
        sides=(
            Side("groupnorm1", lambda c, r: _conv1x1(c, GroupNorm1(c)), "1x1 conv + GroupNorm(1 group)"),
            Side("batchnorm", lambda c, r: _conv1x1(c, nn.BatchNorm2d(c)), "1x1 conv + BatchNorm (eval)"),
            Side("layernorm", lambda c, r: _conv1x1(c, LayerNorm2d(c)), "1x1 conv + LayerNorm over channels"),
        ),
        description="GroupNorm(1) vs BatchNorm vs LayerNorm, each after a 1x1 conv (equal MACs)",
        claim="No published result is tested here: norms count zero MACs, so MACs call the three sides equal and "
        "any time difference is cost MACs cannot see. LowFormer uses GroupNorm(1) before attention and MLP and "
        "BatchNorm in its conv blocks.",
    ),
    ElementPair(
        "activation",
        sides=(
            Side("hardswish", lambda c, r: _conv1x1(c, nn.Hardswish()), "1x1 conv + Hardswish"),
            Side("gelu", lambda c, r: _conv1x1(c, nn.GELU()), "1x1 conv + GELU (exact)"),
            Side("relu", lambda c, r: _conv1x1(c, nn.ReLU()), "1x1 conv + ReLU"),
        ),
        description="Hardswish vs GELU vs ReLU, each after a 1x1 conv (equal MACs)",
        claim="Activations count zero MACs, so MACs call the three sides equal; LowFormer uses Hardswish in its "
        "conv blocks and GELU in its MLPs. Their cost is memory traffic and, for GELU, transcendental math.",
    ),
    ElementPair(
        "upsampling",
        sides=(
            Side(
                "transposed",
                lambda c, r: nn.ConvTranspose2d(c, c, 2, stride=2, bias=False),
                "2x2 transposed conv, stride 2, C->C",
            ),
            Side(
                "interpolate",
                lambda c, r: nn.Sequential(nn.Conv2d(c, c, 1, bias=False), Interpolate(2, "bilinear")),
                "1x1 conv C->C, then bilinear x2 (a quarter of the MACs)",
            ),
            Side(
                "pixelshuffle",
                lambda c, r: nn.Sequential(nn.Conv2d(c, 4 * c, 1, bias=False), nn.PixelShuffle(2)),
                "1x1 conv C->4C, then pixel shuffle x2 (the same function class and MACs as the transposed conv)",
            ),
        ),
        description="2x upsampling: transposed conv vs 1x1 conv + bilinear interpolation vs 1x1 conv + pixel shuffle",
        claim="Lowtention upsamples with a transposed conv. MACs call the transposed conv and the pixel shuffle "
        "equal (they compute the same function class) and the interpolation 4x cheaper; any time difference beyond "
        "that is implementation, not arithmetic.",
    ),
)

for _pair in BUILTIN_PAIRS:
    register_pair(_pair)

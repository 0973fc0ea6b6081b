"""`lowformer info MODEL`: parameters, MACs by operator kind, uncounted ops, feature pyramid.

MODEL is one of ours or any timm model as `timm:NAME`. Before counting, the forward pass at
--image-size is sized on the meta device; one that would not fit in memory is refused (exit 1)."""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn

from ..errors import out_of_memory_as
from ..export import input_channels
from ..factory import check_image_size, create_model, parse_model_name
from ..measure.macs import count_macs
from ..measure.memory import check_forward_fits, meta_copy
from ..models import get_entry, list_models

_HINT = "try a smaller --image-size"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="parameters, MACs and feature shapes of a model", description=__doc__)
    p.add_argument("model", help="model name (see `lowformer info --list`), or timm:NAME for any timm model", nargs="?")
    p.add_argument("--list", action="store_true", help="list the registered models")
    p.add_argument("--image-size", nargs=2, type=int, metavar=("H", "W"), default=(224, 224))
    p.add_argument("--checkpoint", help="load this checkpoint first (any supported format)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run)


def model_info(name: str, image_size: tuple[int, int] = (224, 224), checkpoint: str | None = None) -> dict:
    """Everything `lowformer info` prints, as a dict (the --json schema).

    Raises:
        ValueError: unknown model or an image size outside the input rule (`check_image_size`).
        OutOfMemory: the forward pass at this size would not fit (or did not) in memory.
    """
    source, arch = parse_model_name(name)
    h, w = check_image_size(name, image_size)
    model = create_model(name, checkpoint_path=checkpoint).eval()
    chans = input_channels(model)
    what = f"counting {name} at {h}x{w}"
    check_forward_fits(model, (1, chans, h, w), what, _HINT)
    with out_of_memory_as(what, _HINT):
        report = count_macs(model, (h, w), in_chans=chans)
        feats = _feature_shapes(model, (1, chans, h, w))
    out = {"model": name, "family": get_entry(arch).family if source == "lowformer" else "timm", **report.to_dict()}
    out["features"] = [
        {"index": i, "module": fi["module"], "channels": fi["num_chs"], "stride": fi["reduction"], "shape": shape}
        for i, (fi, shape) in enumerate(zip(_feature_info(model), feats))
    ]
    paper = get_entry(arch).paper if source == "lowformer" else (None, None)
    out["paper"] = {"params_m": paper[0], "macs_m": paper[1]}
    return out


def _feature_info(model: nn.Module) -> list[dict]:
    info = getattr(model, "feature_info", None) or []
    return list(info.info) if hasattr(info, "info") else list(info)


@torch.no_grad()
def _feature_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> list[list[int]]:
    """The shapes of the model's intermediates (timm's `forward_intermediates`), from a shape-only
    run on the meta device; [] for a model without the method."""
    if not hasattr(model, "forward_intermediates"):
        return []
    try:
        feats = meta_copy(model).forward_intermediates(torch.zeros(input_shape, device="meta"), intermediates_only=True)
    except NotImplementedError:  # an operator without a meta kernel: run it for real
        device = next(model.parameters()).device
        feats = model.forward_intermediates(torch.zeros(input_shape, device=device), intermediates_only=True)
    return [list(f.shape) for f in feats]


def _fmt(n: float) -> str:
    return f"{n / 1e6:,.2f}M"


def run(args: argparse.Namespace) -> int:
    if args.list or args.model is None:
        for name in list_models():
            print(name)
        return 0
    info = model_info(args.model, tuple(args.image_size), args.checkpoint)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    h, w = info["image_size"]
    print(f"{info['model']}  ({info['family']})")
    split = f"backbone {_fmt(info['params_backbone'])}, head {_fmt(info['params_head'])}"
    print(f"  params      {_fmt(info['params'])}  ({split})")
    print(f"  MACs        {_fmt(info['macs'])}  at {h}x{w}, batch 1  [{info['convention']}]")
    for kind, macs in info["by_op"].items():
        share = 100 * macs / info["macs"] if info["macs"] else 0.0
        print(f"    {kind:<18}{_fmt(macs):>12}  {share:5.1f}%")
    uncounted = ", ".join(f"{k} x{v}" for k, v in info["uncounted"].items())
    print(f"  not counted {uncounted}")
    print("  features" if info["features"] else "  features    (the model has no forward_intermediates)")
    for f in info["features"]:
        print(
            f"    [{f['index']}] {f['module']:<10} {f['channels']:>5} ch  stride {f['stride']:>2}  {tuple(f['shape'])}"
        )
    return 0

"""`lowformer info MODEL`: parameters, MACs by operator kind, uncounted ops, feature pyramid."""

from __future__ import annotations

import argparse
import json

import torch

from ..factory import create_model
from ..measure.macs import count_macs
from ..models import get_entry


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="parameters, MACs and feature shapes of a model", description=__doc__)
    p.add_argument("model", help="model name (see `lowformer info --list`)", nargs="?")
    p.add_argument("--list", action="store_true", help="list the registered models")
    p.add_argument("--image-size", nargs=2, type=int, metavar=("H", "W"), default=(224, 224))
    p.add_argument("--checkpoint", help="load this checkpoint first (any supported format)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run)


def model_info(name: str, image_size: tuple[int, int] = (224, 224), checkpoint: str | None = None) -> dict:
    """Everything `lowformer info` prints, as a dict (the --json schema)."""
    h, w = image_size
    if h < 32 or w < 32:
        raise ValueError(f"image size must be at least 32x32, got {h}x{w}")
    model = create_model(name, checkpoint_path=checkpoint).eval()
    report = count_macs(model, (h, w))
    with torch.no_grad():
        feats = model.forward_intermediates(torch.zeros(1, model.in_chans, h, w), intermediates_only=True)
    entry = get_entry(name)
    out = {"model": name, "family": entry.family, **report.to_dict()}
    out["features"] = [
        {
            "index": i,
            "module": fi["module"],
            "channels": fi["num_chs"],
            "stride": fi["reduction"],
            "shape": list(f.shape),
        }
        for i, (fi, f) in enumerate(zip(model.feature_info, feats))
    ]
    out["paper"] = {"params_m": entry.paper[0], "macs_m": entry.paper[1]}
    return out


def _fmt(n: float) -> str:
    return f"{n / 1e6:,.2f}M"


def run(args: argparse.Namespace) -> int:
    from ..models import list_models

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
    print("  features")
    for f in info["features"]:
        print(
            f"    [{f['index']}] {f['module']:<10} {f['channels']:>5} ch  stride {f['stride']:>2}  {tuple(f['shape'])}"
        )
    return 0

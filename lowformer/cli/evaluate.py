"""`lowformer eval`: top-1/top-5 of a checkpoint on DIR/val, or on the held-out digits without --data.

Any checkpoint format loads (our training checkpoints, the official evalmodel.pt, timm state
dicts, our safetensors). The evaluation transform and the class order are what the checkpoint
records (every file `lowformer train` writes records them), otherwise the model's data config (224,
crop 0.95, bicubic) and the sorted class folder names. --image-size, --crop-pct and --interpolation
override them, with a warning when they contradict the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from ._args import non_negative_int, positive_int

EXAMPLES = """examples:
  lowformer eval --model lowformer_b0 --checkpoint runs/digits/best.pt          # held-out digits
  lowformer eval --checkpoint runs/digits/best.safetensors                       # the model it names
  lowformer eval --model lowformer_b1 --checkpoint evalmodel.pt --data /data/imagenet
  torchrun --nproc-per-node 4 -m lowformer eval --model lowformer_b3 --checkpoint b3.pt --data /data/imagenet
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="top-1/top-5 of a checkpoint (built-in digits without --data)",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="model name (default: the one a training checkpoint names)")
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="weights, any supported format")
    p.add_argument("--data", metavar="DIR", help="ImageFolder root; DIR/val is evaluated (default: digits)")
    p.add_argument("--image-size", type=int, metavar="S", help="default: the checkpoint's")
    p.add_argument("--crop-pct", type=float, metavar="F", help="resize to S / F, centre-crop S")
    p.add_argument("--interpolation", choices=("bilinear", "bicubic", "nearest", "box", "hamming", "lanczos"))
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--workers", type=non_negative_int, default=0)
    p.add_argument("--amp", choices=("bf16", "fp16"))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", choices=("cpu", "cuda"))
    p.add_argument(
        "--gpu-decode", action="store_true", help="decode and resize JPEGs on the CUDA device (nvJPEG), not in workers"
    )
    p.add_argument("--threads", type=positive_int, metavar="N", help="intra-op CPU threads (torch.set_num_threads)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..train import evaluate

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        raise ValueError(f"--crop-pct must be in (0, 1], got {args.crop_pct}")
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    result = evaluate(
        args.model,
        args.checkpoint,
        data_dir=args.data,
        image_size=args.image_size,
        crop_pct=args.crop_pct,
        interpolation=args.interpolation,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        amp=args.amp,
        channels_last=args.channels_last,
        progress=not (args.no_progress or args.json),
        gpu_decode=args.gpu_decode,
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun every process evaluates its share; the first one reports
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    where = f"{args.data}/val" if args.data else "the built-in digits held-out split"
    print(
        f"top-1 {result.top1:.2f}%  top-{result.topk} {result.top5:.2f}%  loss {result.loss:.4f}  "
        f"on {result.images} images of {where} "
        f"({result.image_size}x{result.image_size}, crop {result.crop_pct:g}, {result.interpolation})"
    )
    if result.skipped_images:
        print(f"skipped {result.skipped_images} unreadable images, e.g. {', '.join(result.skipped_paths[:3])}")
    return 0

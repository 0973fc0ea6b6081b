"""`lowformer export MODEL --out PATH`: write an ONNX or TorchScript file, in deploy mode by default,
and with --verify compare it with PyTorch on random inputs (exit 1 if the error bound is exceeded).
Method, fp16 policy and limits: docs/export.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..deploy import deploy
from ..export import DEFAULT_OPSET, FORMATS, MIN_FP16_OPSET, export, input_channels, verify
from ..factory import create_model
from ..models import get_entry

EXAMPLES = """examples:
  lowformer export lowformer_b1 --checkpoint evalmodel.pt --out b1.onnx --verify
  lowformer export lowformer_b1 --out b1.onnx --dynamic-batch --dynamic-size --verify
  lowformer export lowformer_e3 --out e3_fp16.onnx --fp16 --verify
  lowformer export edgevit_xs --format torchscript --image-size 256 256 --out edgevit_xs.pt --verify
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a model to ONNX or TorchScript and verify it",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="model name (see `lowformer info --list`)")
    p.add_argument("--checkpoint", help="load this checkpoint first (any supported format); default: random weights")
    p.add_argument("--format", choices=FORMATS, default="onnx", help="default: onnx")
    p.add_argument("--image-size", nargs=2, type=int, metavar=("H", "W"), default=(224, 224), help="default: 224 224")
    p.add_argument("--batch-size", type=int, default=1, help="batch of the exported input shape (default: 1)")
    p.add_argument(
        "--dynamic-batch", action="store_true", help="symbolic batch dimension; --verify also checks batch 3"
    )
    p.add_argument(
        "--dynamic-size", action="store_true", help="symbolic height and width; --verify also checks another size"
    )
    p.add_argument(
        "--fp16", action="store_true", help="ONNX: fp16 weights and activations; softmax, norms, attention logits fp32"
    )
    p.add_argument(
        "--deploy",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="export the deploy-mode model (BatchNorm and norm affines folded; default: on)",
    )
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default: {DEFAULT_OPSET})")
    p.add_argument("--out", required=True, type=Path, help="file to write; its folder is created")
    p.add_argument(
        "--verify",
        action="store_true",
        help="run the file against PyTorch on random inputs at every shape it promises; exit 1 above the bound",
    )
    p.set_defaults(run=run)


def _check_args(args: argparse.Namespace) -> None:
    entry = get_entry(args.model)  # ValueError naming close matches for an unknown model
    h, w = args.image_size
    if h < 32 or w < 32:
        raise ValueError(f"image size must be at least 32x32, got {h}x{w}")
    if h % entry.size_divisor or w % entry.size_divisor:
        raise ValueError(f"{args.model} needs height and width that are multiples of {entry.size_divisor}, got {h}x{w}")
    if args.batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {args.batch_size}")
    if args.fp16 and args.format != "onnx":
        raise ValueError(
            "--fp16 is ONNX only; export TorchScript in fp32 and run it under torch.autocast, "
            "which keeps softmax and normalisations in fp32"
        )
    if args.fp16 and args.opset < MIN_FP16_OPSET:
        raise ValueError(f"--fp16 needs --opset {MIN_FP16_OPSET} or later")
    if args.out.is_dir():
        raise ValueError(f"--out {args.out} is a folder; give a file name")


def _dynamic_axes(args: argparse.Namespace) -> str:
    names = (["batch"] if args.dynamic_batch else []) + (["height", "width"] if args.dynamic_size else [])
    if args.format == "torchscript":
        # NOTE: a traced graph reads shapes at run time, so it is never fixed to the export shape;
        # --dynamic-batch/--dynamic-size then choose the extra shapes --verify proves it at.
        return "all (traced shapes are read at run time)"
    return ", ".join(names) or "none (fixed shape)"


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    model = create_model(args.model, checkpoint_path=args.checkpoint).eval()
    if args.deploy:
        model = deploy(model, inplace=True, memory_format="keep")  # the plain ops, for tracing
    image_size = tuple(args.image_size)
    path = export(
        model,
        args.out,
        args.format,
        image_size,
        dynamic_batch=args.dynamic_batch,
        dynamic_size=args.dynamic_size,
        fp16=args.fp16,
        opset=args.opset,
        batch_size=args.batch_size,
        metadata={"lowformer.deploy": "on" if args.deploy else "off", "lowformer.checkpoint": args.checkpoint or ""},
    )
    size_mb = path.stat().st_size / 1e6
    h, w = image_size
    print(f"wrote {path} ({size_mb:.1f} MB)")
    fmt = f"onnx, opset {args.opset}" if args.format == "onnx" else "torchscript (traced, frozen)"
    precision = "fp16 (softmax, norms, attention logits fp32; fp32 input/output)" if args.fp16 else "fp32"
    print(f"  format        {fmt}, {precision}")
    print(f"  model         {args.model}, deploy {'on' if args.deploy else 'off'}")
    print(f"  weights       {args.checkpoint or 'random (no --checkpoint)'}")
    print(f"  input         {args.batch_size}x{input_channels(model)}x{h}x{w} float32")
    print(f"  dynamic axes  {_dynamic_axes(args)}")
    if not args.verify:
        return 0
    report = verify(
        model,
        path,
        args.format,
        image_size,
        dynamic_batch=args.dynamic_batch,
        dynamic_size=args.dynamic_size,
        fp16=args.fp16,
        batch_size=args.batch_size,
    )
    print(report.summary())
    if not report.passed:
        print(f"lowformer export: verification failed; {path} is kept for inspection", file=sys.stderr)
        return 1
    return 0

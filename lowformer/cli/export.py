"""`lowformer export MODEL --out PATH`: write an ONNX or TorchScript file, in deploy mode by default,
and with --verify compare it with PyTorch on random inputs (exit 1 if the error bound is exceeded).
MODEL is one of ours or any timm model as `timm:NAME`. ONNX goes through torch's dynamo exporter;
`--exporter torchscript` is the legacy fallback for a model it cannot capture. Method, fp16 policy
and limits: docs/export.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

from torch import nn

from .._io import check_writable
from ..deploy import deploy
from ..errors import VerificationError, out_of_memory_as
from ..export import (
    DEFAULT_EXPORTER,
    DEFAULT_OPSET,
    EXPORTERS,
    FORMATS,
    MIN_FP16_OPSET,
    export,
    input_channels,
    verify,
    verify_shapes,
)
from ..export.onnx import check_exporter
from ..factory import check_image_size, create_model, parse_model_name, size_divisor_of
from ..measure.memory import check_forward_fits, tensor_bytes

_HINT = "try a smaller --image-size or --batch-size"

EXAMPLES = """examples:
  lowformer export lowformer_b1 --checkpoint evalmodel.pt --out b1.onnx --verify
  lowformer export lowformer_b1 --out b1.onnx --dynamic-batch --dynamic-size --verify
  lowformer export lowformer_e3 --out e3_fp16.onnx --fp16 --verify
  lowformer export edgevit_xs --format torchscript --image-size 256 256 --out edgevit_xs.pt --verify
  lowformer export timm:NAME --exporter torchscript --out m.onnx --verify   # a model dynamo cannot capture
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a model to ONNX or TorchScript and verify it",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="model name (see `lowformer info --list`), or timm:NAME for any timm model")
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
    p.add_argument(
        "--exporter",
        choices=EXPORTERS,
        help=f"ONNX exporter (default: {DEFAULT_EXPORTER}); torchscript: the legacy one, deprecated by torch, "
        "for a model the dynamo exporter cannot capture or an opset below 18",
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
    """Every usage error, before anything slow: ValueError (exit 2)."""
    parse_model_name(args.model)  # unknown model: close matches, and the timm: hint
    check_image_size(args.model, args.image_size)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.fp16 and args.format != "onnx":
        raise ValueError(
            "--fp16 is ONNX only; export TorchScript in fp32 and run it under torch.autocast, "
            "which keeps softmax and normalisations in fp32"
        )
    if args.fp16 and args.opset < MIN_FP16_OPSET:
        raise ValueError(f"--fp16 needs --opset {MIN_FP16_OPSET} or later")
    if args.format == "onnx":
        check_exporter(args.exporter or DEFAULT_EXPORTER, args.opset)
    elif args.exporter is not None:
        raise ValueError("--exporter applies to --format onnx; a TorchScript file is always traced")


def _dynamic_axes(args: argparse.Namespace) -> str:
    names = (["batch"] if args.dynamic_batch else []) + (["height", "width"] if args.dynamic_size else [])
    if args.format == "torchscript":
        # NOTE: a traced graph reads shapes at run time, so it is never fixed to the export shape;
        # --dynamic-batch/--dynamic-size then choose the extra shapes --verify proves it at.
        return "all (traced shapes are read at run time)"
    return ", ".join(names) or "none (fixed shape)"


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    check_writable(args.out)  # a read-only folder, a folder in the way: say so before the slow part
    model = create_model(args.model, checkpoint_path=args.checkpoint).eval()
    if args.deploy:
        model = deploy(model, inplace=True, memory_format="keep")  # the plain ops, for tracing
    shapes = _shapes_to_run(args, model)
    largest = max(shapes, key=math.prod)
    what = f"exporting {args.model} at {_shape_text(model, largest)}"
    # besides the forward pass, the exporter holds the traced graph and its serialised bytes
    check_forward_fits(model, _full(model, largest), what, _HINT, reserve_bytes=2 * tensor_bytes(model))
    metadata = {"lowformer.deploy": "on" if args.deploy else "off", "lowformer.checkpoint": args.checkpoint or ""}
    with out_of_memory_as(what, _HINT), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default", FutureWarning)  # e.g. torch deprecating the legacy exporter
        path = export(
            model,
            args.out,
            args.format,
            tuple(args.image_size),
            dynamic_batch=args.dynamic_batch,
            dynamic_size=args.dynamic_size,
            fp16=args.fp16,
            opset=args.opset,
            batch_size=args.batch_size,
            metadata=metadata,
            exporter=args.exporter,
        )
    for w in caught:  # the warnings Python would show, as one line each
        print(f"lowformer export: warning: {w.message}", file=sys.stderr)
    _print_written(args, path, _shape_text(model, shapes[0]))
    if args.verify:
        with out_of_memory_as(f"verifying {path}", _HINT):
            report = verify(model, path, args.format, fp16=args.fp16, shapes=shapes)
        print(report.summary())
        if not report.passed:
            raise VerificationError(
                f"verification failed (max rel err {report.max_rel_err:.2e}, bound {report.bound:.0e}"
                f"{'' if report.finite else ', non-finite values'}); {path} is kept for inspection"
            )
    return 0


def _shapes_to_run(args: argparse.Namespace, model: nn.Module) -> list[tuple[int, int, int]]:
    """(B, H, W): the export shape first, then with --verify the shapes verification adds."""
    h, w = args.image_size
    if not args.verify:
        return [(args.batch_size, h, w)]
    return verify_shapes((h, w), args.batch_size, args.dynamic_batch, args.dynamic_size, size_divisor_of(model))


def _full(model: nn.Module, shape: tuple[int, int, int]) -> tuple[int, int, int, int]:
    return (shape[0], input_channels(model), *shape[1:])


def _shape_text(model: nn.Module, shape: tuple[int, int, int]) -> str:
    return "x".join(map(str, _full(model, shape)))


def _print_written(args: argparse.Namespace, path: Path, input_shape: str) -> None:
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if args.format == "onnx":
        exporter = "dynamo" if (args.exporter or DEFAULT_EXPORTER) == "dynamo" else "TorchScript-based"
        fmt = f"onnx, opset {args.opset}, {exporter} exporter"
    else:
        fmt = "torchscript (traced, frozen)"
    precision = "fp16 (softmax, norms, attention logits fp32; fp32 input/output)" if args.fp16 else "fp32"
    print(f"  format        {fmt}, {precision}")
    print(f"  model         {args.model}, deploy {'on' if args.deploy else 'off'}")
    print(f"  weights       {args.checkpoint or 'random (no --checkpoint)'}")
    print(f"  input         {input_shape} float32")
    print(f"  dynamic axes  {_dynamic_axes(args)}")

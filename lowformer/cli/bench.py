"""`lowformer bench`: throughput and latency of our models and any timm model, on the best device.

With no arguments it times the built-in model set (LowFormer B0/B1/E1, EdgeViT-XS and timm peers)
in both modes, prints a table with the MACs-vs-speed rank correlation, and writes JSON and a plot
to bench-results/. `--task detection` times backbone + RetinaNet FPN neck at 512x512 instead (the
papers' dense-prediction speed setting), `--task segmentation` the whole Semantic FPN. Method and
output schema: docs/bench.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from ..bench import BACKENDS, DEFAULT_MODELS, MODES, PRECISIONS, PRESETS, TimingPolicy, plan, plan_compare, run_plan
from ..bench.backends import TUNED
from ..bench.compare import MIN_ROUNDS, run_compare
from ..bench.models import DETECTION_MODELS, TASKS
from ..bench.presets import default_round_timing, default_timing
from ..errors import LowformerRuntimeError
from ..measure.env import resolve_device
from ..report import format_bench, format_compare, plot_bench
from ._args import (
    check_outputs,
    image_size,
    int_at_least,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    warn_if_busy,
)

EXAMPLES = """examples:
  lowformer bench                                   # default model set, both modes, best device
  lowformer bench -m lowformer_b1 timm:fastvit_t8 --batch-size 1 16 64 --image-size 224 256
  lowformer bench -m timm:mobileone_s1 --reparam --backend eager torchscript onnxruntime
  lowformer bench -m lowformer_b1 --mode latency --jobs 2 --threads 1
  lowformer bench --preset paper-latency -m lowformer_b1 lowformer_e1
  lowformer bench --task detection                  # backbone + FPN neck at 512x512, detection model set
  lowformer bench --task detection -m lowformer_b1 timm:resnet50 --mode latency --image-size 512 640x640
  lowformer bench --task segmentation --mode latency   # Semantic FPN at 512x512, full-resolution logits
  lowformer bench --compare lowformer_b1 timm:lowformer_b1 --batch-size 16
  lowformer bench --compare lowformer_b1 lowformer_b1@backend=torchscript lowformer_b1@channels_last
  lowformer bench -m lowformer_b1 timm:lowformer_b1 --tuned --mode latency   # best against best
  lowformer bench --compare timm:lowformer_b1@backend=compile lowformer_b1@backend=tuned --batch-size 16
"""

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="measure throughput and latency (default: the README's model set)",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = p.add_argument_group("what to time (list options sweep every combination)")
    what.add_argument(
        "-m",
        "--model",
        action="extend",
        nargs="+",
        metavar="NAME",
        help=f"our model name or timm:NAME; repeatable (default: {' '.join(DEFAULT_MODELS)}; with --task "
        f"detection or segmentation: {' '.join(DETECTION_MODELS)})",
    )
    what.add_argument(
        "--task",
        choices=TASKS,
        default="classification",
        help="classification: the classifier; detection: backbone + RetinaNet FPN neck (P3-P7, 256 ch); "
        "segmentation: the whole Semantic FPN (150 classes, full-resolution logits). The dense tasks default "
        "to image 512x512 and throughput batch 4 on CPU, 32 on CUDA (default: classification)",
    )
    what.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    what.add_argument("--mode", nargs="+", choices=MODES, help="default: both")
    what.add_argument(
        "--batch-size",
        nargs="+",
        type=positive_int,
        metavar="N",
        help="throughput batch sizes (default 256 on CUDA, 16 on CPU); latency is batch 1",
    )
    what.add_argument(
        "--image-size",
        nargs="+",
        type=image_size,
        metavar="S|HxW",
        help="default: 224 (--task detection/segmentation: 512)",
    )
    what.add_argument("--precision", nargs="+", choices=PRECISIONS, help="fp32 = TF32 off; fp16/bf16 = autocast")
    what.add_argument("--backend", nargs="+", choices=BACKENDS, help="default: eager")
    what.add_argument(
        "--tuned",
        action="store_true",
        help="each model (ours and timm:) in its own fastest verified configuration, found by `lowformer tune` "
        "(minutes per model: it compiles every candidate)",
    )
    what.add_argument(
        "--compile-mode",
        choices=COMPILE_MODES,
        help="torch.compile mode (backend compile; on CPU with inductor freezing); reduce-overhead for latency",
    )
    what.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    what.add_argument("--reparam", action="store_true", help="reparameterise first (MobileOne, FastViT, RepViT, ...)")
    what.add_argument("--threads", nargs="+", type=positive_int, metavar="N", help="intra-op CPU threads")
    what.add_argument("--jobs", type=positive_int, default=1, help="concurrent processes sharing the device")
    what.add_argument("--preset", choices=list(PRESETS), help="a paper's protocol; explicit options override it")
    what.add_argument("--list-presets", action="store_true", help="describe the presets and exit")
    what.add_argument("--peak-tflops", type=positive_float, help="device peak TFLOP/s for MFU (default: GPU table)")
    what.add_argument("--no-cudnn-benchmark", action="store_true", help="leave cudnn.benchmark off (CUDA)")

    timing = p.add_argument_group("timing (default: bounded by time; see the line printed before the run)")
    timing.add_argument("--warmup-iters", type=non_negative_int, metavar="N", help="at least N warm-up calls")
    timing.add_argument("--warmup-seconds", type=non_negative_float, metavar="S", help="and at least S seconds")
    timing.add_argument("--iters", type=positive_int, metavar="N", help="at least N timed calls (per --compare round)")
    timing.add_argument("--seconds", type=non_negative_float, metavar="S", help="and at least S seconds of them")
    timing.add_argument("--max-iters", type=positive_int, metavar="N", help="at most N timed calls")
    timing.add_argument("--max-seconds", type=positive_float, metavar="S", help="stop timing after S seconds")

    paired = p.add_argument_group("paired comparison")
    paired.add_argument(
        "--compare",
        nargs="+",
        metavar="SPEC",
        help="MODEL[@key=value,...] (keys: backend, precision, compile_mode, channels_last, reparam, threads); "
        "interleaved A B | B A rounds in one process, per-pair speedup min/median/max",
    )
    paired.add_argument("--rounds", type=int_at_least(MIN_ROUNDS), help="rounds of a comparison (default 10)")

    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="PATH", help="write results as JSON")
    out.add_argument("--csv", metavar="PATH", help="write results as CSV")
    out.add_argument("--plot", metavar="PATH", help="write the MACs-vs-speed plot (PNG)")
    out.add_argument(
        "--out-dir",
        default="bench-results",
        metavar="DIR",
        help="where JSON and plot go when no path is given: DIR/bench-YYYYmmdd-HHMMSS.{json,png}",
    )
    out.add_argument("--no-save", action="store_true", help="print only; write nothing unless a path is given")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    out.add_argument("-v", "--verbose", action="store_true", help="log each step (and failures with tracebacks)")
    p.set_defaults(run=run)


# the timing flags and the TimingPolicy fields they set (the policy's errors speak the flags)
TIMING_FLAGS = {
    "warmup_iters": "--warmup-iters",
    "warmup_s": "--warmup-seconds",
    "min_iters": "--iters",
    "min_s": "--seconds",
    "max_iters": "--max-iters",
    "max_s": "--max-seconds",
}


def _timing_flags(args: argparse.Namespace) -> dict:
    """The timing flags given, by TimingPolicy field."""
    given = {
        "warmup_iters": args.warmup_iters,
        "warmup_s": args.warmup_seconds,
        "min_iters": args.iters,
        "min_s": args.seconds,
        "max_iters": args.max_iters,
        "max_s": args.max_seconds,
    }
    return {k: v for k, v in given.items() if v is not None}


def _with_flags(default: TimingPolicy, flags: dict) -> TimingPolicy | None:
    """The library's default with the flags given (None when none is: the library decides)."""
    return default.override(flags, names=TIMING_FLAGS) if flags else None


def _output_paths(args: argparse.Namespace, stem: str, plot: bool) -> tuple[str | None, str | None, str | None]:
    """(JSON, CSV, plot) paths: those given, else --out-dir/STEM-YYYYmmdd-HHMMSS.{json,png} unless
    --no-save. Checked before the run: each must be writable (and --out-dir a folder)."""
    if args.json or args.csv or args.plot or args.no_save:
        paths = args.json, args.csv, args.plot if plot else None
        check_outputs(list(paths))
        return paths
    check_outputs([], folders=[args.out_dir])
    base = Path(args.out_dir) / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    paths = str(base.with_suffix(".json")), None, str(base.with_suffix(".png")) if plot else None
    check_outputs(list(paths))
    return paths


def _show_tuning() -> None:
    """Print the tuner's progress lines: tuning compiles every candidate, minutes per model."""
    logger = logging.getLogger("lowformer.tuning.tuner")
    if logger.getEffectiveLevel() > logging.INFO:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("  tune: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _print_tuned(choices: list[tuple[str, str | None]]) -> None:
    """Which configuration the tuner picked for each tuned row (the JSON has every candidate)."""
    if choices:
        print("tuned configurations (fastest verified candidate; every candidate in the JSON):")
        for what, note in choices:
            print(f"  {what}: {(note or '').removeprefix('tuned: ')}")


def _raise_if_failed(statuses: list[str], what: str) -> None:
    """Exit 1 (after the table and the files) when a configuration failed; skipped ones are fine."""
    failed = sum(status not in ("ok", "skipped") for status in statuses)
    if failed:
        raise LowformerRuntimeError(f"{failed} of {len(statuses)} {what} failed (see the table above)")


def _compare_options(args: argparse.Namespace, device: str) -> dict:
    """`plan_compare`'s options from the flags given: one value each; the library fills in the rest."""
    clashes = [
        flag
        for flag, given in (
            ("--model", args.model),
            ("--mode", args.mode),
            ("--preset", args.preset),
            ("--plot", args.plot),
            ("--jobs", args.jobs != 1),
        )
        if given
    ]
    if clashes:
        raise ValueError(f"--compare takes its models from the specs and runs one process; drop {', '.join(clashes)}")
    single = {
        "batch_size": ("--batch-size", args.batch_size),
        "image_size": ("--image-size", args.image_size),
        "precision": ("--precision", args.precision),
        "backend": ("--backend", args.backend),
        "threads": ("--threads", args.threads),
    }
    options = {}
    for key, (flag, values) in single.items():
        if values and len(values) > 1:
            raise ValueError(f"--compare takes one {flag} value (set per configuration with MODEL@key=value)")
        if values:
            options[key] = values[0]
    if args.rounds is not None:
        options["rounds"] = args.rounds
    if args.tuned:
        options["backend"] = TUNED
    flags = _timing_flags(args)
    warmup = {k: v for k, v in flags.items() if k.startswith("warmup")}
    per_round = {k: v for k, v in flags.items() if not k.startswith("warmup")}
    return {
        **options,
        "task": args.task,
        "device": device,
        "compile_mode": args.compile_mode,
        "channels_last": args.channels_last,
        "reparam": args.reparam,
        "cudnn_benchmark": not args.no_cudnn_benchmark,
        "warmup": _with_flags(default_timing(device), warmup),
        "round_timing": _with_flags(default_round_timing(device), per_round),
    }


def _run_compare(args: argparse.Namespace, device: str) -> int:
    comparison = plan_compare(args.compare, **_compare_options(args, device))
    json_path, csv_path, _ = _output_paths(args, "compare", plot=False)
    print(comparison.describe(), flush=True)
    if any(c.backend == TUNED for _, c in comparison.configs):
        _show_tuning()
    report = run_compare(comparison, progress=not args.no_progress and sys.stderr.isatty())
    print(format_compare(report))
    _print_tuned([(f"{tag} {e.label}", e.backend_note) for tag, e in zip(report.tags, report.entries) if e.tuning])
    for path, write in ((json_path, report.write_json), (csv_path, report.write_csv)):
        if path:
            print(f"wrote {write(path)}")
    _raise_if_failed([e.status for e in report.entries], "configuration(s)")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
    if args.list_presets:
        for name, preset in PRESETS.items():
            print(f"{name}: {preset.description}")
        return 0
    device = resolve_device(args.device)
    if args.tuned and (args.backend or args.compile_mode):
        raise ValueError("--tuned picks each model's backend itself; drop --backend and --compile-mode")
    if args.compare:
        return _run_compare(args, device)
    if args.rounds is not None:
        raise ValueError("--rounds applies to --compare")
    p = plan(
        args.model,
        task=args.task,
        modes=args.mode,
        device=device,
        batch_sizes=args.batch_size,
        image_sizes=args.image_size,
        precisions=args.precision,
        backends=[TUNED] if args.tuned else args.backend,
        compile_mode=args.compile_mode,
        channels_last=args.channels_last,
        reparam=args.reparam,
        threads=args.threads,
        jobs=args.jobs,
        preset=args.preset,
        timing=_with_flags(default_timing(device, args.preset), _timing_flags(args)),
        peak_tflops=args.peak_tflops,
        cudnn_benchmark=not args.no_cudnn_benchmark,
    )
    json_path, csv_path, plot_path = _output_paths(args, "bench", plot=True)
    print(p.describe(), flush=True)
    warn_if_busy(device, "if other processes are busy, CPU timings are noisy (a paired --compare is robust to that)")
    if args.tuned:
        _show_tuning()
    start = time.perf_counter()
    report = run_plan(p, progress=not args.no_progress and sys.stderr.isatty())
    print()
    print(format_bench(report))
    tuned = [r for r in report.results if r.backend == TUNED and r.ok]
    _print_tuned([(f"{r.model} {r.mode} batch {r.batch_size}", r.backend_note) for r in tuned])
    for path, write in ((json_path, report.write_json), (csv_path, report.write_csv)):
        if path:
            print(f"wrote {write(path)}")
    if plot_path:
        if any(r.ok and r.macs for r in report.results):
            print(f"wrote {plot_bench(report, plot_path)}")
        else:
            print("no plot: no configuration succeeded with a MAC count")
    print(f"took {time.perf_counter() - start:.0f} s")
    _raise_if_failed([r.status for r in report.results], "configuration(s)")
    return 0

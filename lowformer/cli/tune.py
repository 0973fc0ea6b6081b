"""`lowformer tune MODEL`: find the fastest verified way to run a model on this machine, and package it.

Every candidate that can run here (deploy mode in each layout, eager, torch.compile, AOTInductor,
ONNX Runtime, CUDA graphs) is built, verified against the fp32 eager model on fresh random inputs,
and timed in interleaved rounds; the table shows each one's prepare time, speed and error. With
--out, the fastest verified candidate of that format is written as a package that production loads
without searching or compiling (`lowformer.load_deployed`): .pt2 is AOTInductor, .onnx ONNX Runtime.
MODEL is one of ours or any timm model as timm:NAME. Method: docs/deploy.md.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from .._io import write_json
from ..bench.backends import PRECISIONS
from ..bench.presets import default_batch_size
from ..errors import VerificationError, out_of_memory_as
from ..factory import check_image_size, create_model, parse_model_name
from ..measure.env import resolve_device
from ..measure.memory import check_forward_fits
from ..measure.session import make_input
from ..report.tables import format_ms, format_number, render_table
from ..tuning import OBJECTIVES, check_package, package_backend, require_best, save_tuned, tune
from ..tuning.tuner import TuneResult, candidate_options
from ._args import check_outputs, image_size, int_at_least, positive_int, warn_if_busy

EXAMPLES = """examples:
  lowformer tune lowformer_b1 --batch-size 16                       # the table: every candidate here
  lowformer tune lowformer_b1 --checkpoint evalmodel.pt --batch-size 1 --out b1.pt2
  lowformer tune lowformer_e1 --out e1.onnx --candidates eager/packed onnxruntime
  lowformer tune timm:lowformer_b1 --batch-size 16 --json timm_b1.json
  lowformer tune --list-candidates --device cuda
"""

_HINT = "try a smaller --batch-size or --image-size"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune",
        help="find the fastest verified way to run a model here, and package it (.pt2 / .onnx)",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", nargs="?", help="model name (see `lowformer info --list`), or timm:NAME")
    p.add_argument("--checkpoint", help="load this checkpoint first (any supported format); default: random weights")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=positive_int, metavar="N", help="default: 16 on CPU, 256 on CUDA")
    p.add_argument("--image-size", type=image_size, default=(224, 224), metavar="S|HxW", help="default: 224")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="fp32 = TF32 off; fp16/bf16 = autocast")
    p.add_argument(
        "--objective",
        choices=OBJECTIVES,
        help="throughput: lowest median call time; latency: lowest 90th percentile "
        "(default: latency at batch 1, else throughput)",
    )
    p.add_argument(
        "--candidates",
        nargs="+",
        metavar="NAME",
        help="try only these (see --list-candidates); the --out format's backend must be among them",
    )
    p.add_argument("--list-candidates", action="store_true", help="list the default candidates of --device and exit")
    p.add_argument("--rounds", type=int_at_least(1), default=5, help="interleaved timing rounds (default 5)")
    p.add_argument("--threads", type=positive_int, metavar="N", help="intra-op CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, help="write the winner of this format: .pt2 (AOTInductor) or .onnx")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the tuning table and environment as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="log each step (and failures with tracebacks)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
    device = resolve_device(args.device)
    if args.list_candidates:
        for option in candidate_options(device.split(":")[0]):
            print(option.name)
        return 0
    candidates = _check_args(args)
    check_outputs([args.out, args.json])  # before minutes of compiling
    model = create_model(args.model, checkpoint_path=args.checkpoint).eval().to(device)
    batch = args.batch_size or default_batch_size(device)
    objective = args.objective or ("latency" if batch == 1 else "throughput")
    shape = (batch, getattr(model, "in_chans", 3), *args.image_size)
    what = f"tuning {args.model} at {'x'.join(map(str, shape))}"
    check_forward_fits(model, shape, what, _HINT)
    x = make_input(shape, device)
    warn_if_busy(device, "the timings are noisy and may pick a different winner on a quiet machine")
    start = time.perf_counter()
    with out_of_memory_as(what, _HINT):
        result = tune(
            model,
            x,
            args.precision,
            objective,
            candidates=candidates,
            rounds=args.rounds,
            threads=args.threads,
            progress=lambda line: print(line, flush=True),
        )
    print()
    print(format_tune(result.to_dict()))
    if args.json:
        print(f"wrote {write_json(args.json, result.to_dict())}")
    best = require_best(result)
    if args.out:
        _write_package(args, result, model, best.name)
    print(f"took {time.perf_counter() - start:.0f} s")
    return 0


def _check_args(args: argparse.Namespace) -> list[str] | None:
    """Every usage error, before anything slow (ValueError: exit 2)."""
    if not args.model:
        raise ValueError("name a model (see `lowformer info --list`), or give --list-candidates")
    parse_model_name(args.model)
    check_image_size(args.model, args.image_size)
    if args.out is not None:
        backend = package_backend(args.out)
        if args.candidates and not any(c.split("/")[0].split(":")[0] == backend for c in args.candidates):
            raise ValueError(f"--out {args.out} is written from a {backend} candidate; add one to --candidates")
    return args.candidates


def _write_package(args: argparse.Namespace, result: TuneResult, model, best: str) -> None:
    with out_of_memory_as(f"writing {args.out}", _HINT):
        path, chosen = save_tuned(result, args.out, model, name=args.model, checkpoint=args.checkpoint)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): {chosen.name}, {format_ms(chosen.latency_ms_p50)} ms")
    if chosen.name != best:
        winner = next(c for c in result.candidates if c.name == best)
        print(
            f"  note: the fastest candidate overall is {best} ({format_ms(winner.latency_ms_p50)} ms); "
            f"{path.suffix} packages run {chosen.backend}"
        )
    check = check_package(path, model)
    verdict = "ok" if check.passed else "FAILED"
    print(
        f"  loaded in {check.load_s:.2f} s, first output {check.first_call_s:.2f} s later (nothing compiled); "
        f"max rel err {check.max_rel_err:.1e} vs fp32 eager, bound {check.bound:.0e}: {verdict}"
    )
    if not check.passed:
        raise VerificationError(f"{path} does not reproduce the model (see above); it is kept for inspection")


def format_tune(record: dict) -> str:
    """The tuning table of a `TuneResult.to_dict()` record (or the `tuning` a tuned benchmark row
    keeps): one row per candidate, the winner marked, failures explained under it."""
    s = record["settings"]
    env = record.get("environment")
    shape = "x".join(map(str, s["input_shape"]))
    head = []
    if env:
        head.append(
            f"{env['device_name']} ({env['device']}), torch {env['torch']}, {env['date']}, threads {s['threads']}, "
            f"load {format_number(env.get('load_avg_1m'), '.1f')}"
        )
    head.append(
        f"input {shape}, {s['precision']} (max rel err bound {s['tolerance']:.0e} vs fp32 eager), "
        f"objective {s['objective']}, {s['rounds']} interleaved rounds"
    )
    headers = ["", "candidate", "status", "prepare s", "max rel err", "ms p50", "ms p10-p90", "img/s", "vs eager"]
    rows, notes = [], []
    batch = s["input_shape"][0]
    for c in record["candidates"]:
        status = c["status"]
        if status != "ok":
            notes.append(f"[{len(notes) + 1}] {c['name']}: {c['error']}")
            status = f"{status} [{len(notes)}]"
        p50, speedup = c["latency_ms_p50"], c["speedup_vs_eager"]
        rows.append(
            [
                "*" if c["name"] == record["best"] else "",
                c["name"],
                status,
                format_number(c["prepare_s"], ".1f"),
                format_number(c["max_rel_err"], ".1e"),
                format_ms(p50),
                f"{format_ms(c['latency_ms_p10'])}-{format_ms(c['latency_ms_p90'])}" if p50 is not None else "-",
                format_number(batch / p50 * 1e3 if p50 else None, ".1f"),
                format_number(speedup, ".2f") + "x" * (speedup is not None),
            ]
        )
    table = render_table(headers, rows, [False, False, False, True, True, True, True, True, True])
    statistic = "median" if s["objective"] == "throughput" else "90th percentile"
    legend = (
        f"(* = picked: fastest verified by {statistic} call time; "
        "vs eager = per-round speedup over the first eager candidate, median)"
    )
    return "\n".join([*head, table, *notes, legend])

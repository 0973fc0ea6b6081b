"""`lowformer analyze`: counted MACs against measured time, on this device.

  elements  design-element pairs (fused vs unfused MBConv, depthwise vs dense conv, Lowtention vs
            MHSA vs none, attention stride, norms, activations, upsampling) over a channels x
            resolution grid: heatmaps of time ratio | MAC ratio, CSV/JSON of every cell
  model     where one model's time goes per operator kind, against its share of MACs
  models    MACs vs measured latency and throughput across models, rank correlations

Every command writes its results, figures and an updated report.md to --out (default
analysis-results/). Method and outputs: docs/analyze.md.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
import time
from pathlib import Path

from ..analyze import get_pair, list_pairs, plan_elements, plan_models, profile_model, run_elements, run_models
from ..analyze.elements import MIN_CHANNELS, MIN_RESOLUTION
from ..analyze.profile import safe_name
from ..analyze.sweep import MIN_ROUNDS
from ..bench import BACKENDS, MODES, PRECISIONS
from ..errors import LowformerRuntimeError
from ..measure.env import resolve_device
from ..report import format_elements, format_models, format_profile, plot_element_heatmaps, plot_models, plot_profile
from ..report.markdown import REPORT_NAME, write_report
from ._args import (
    check_outputs,
    image_size,
    int_at_least,
    non_negative_float,
    positive_float,
    positive_int,
    warn_if_busy,
)

EXAMPLES = """examples:
  lowformer analyze --list
  lowformer analyze elements --quick                        # every pair, small grid, < 1 min on a CPU
  lowformer analyze elements fused-mbconv depthwise-conv --channels 16 32 64 128 --resolutions 14 28 56
  lowformer analyze elements --mode throughput --batch-size 32 --budget 600 --out results
  lowformer analyze model lowformer_b1 --mode throughput
  lowformer analyze models lowformer_b1 lowformer_e1 timm:fastvit_t8 timm:repvit_m1_1 timm:mobilenetv3_large_100
"""

DEFAULT_OUT = "analysis-results"

# what a busy machine means for the numbers (see `warn_if_busy`)
_FAIR_RATIOS = "the interleaved rounds keep the ratios fair, the absolute times are not"
_USE_COMPARE = "compare configurations with `lowformer bench --compare`, which interleaves them"


def _common(p: argparse.ArgumentParser, backend: bool = True) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS, help="fp32 = TF32 off; fp16/bf16 = autocast")
    if backend:
        p.add_argument("--backend", default="eager", choices=BACKENDS, help="default: eager")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--threads", type=positive_int, metavar="N", help="intra-op CPU threads")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"output directory (default {DEFAULT_OUT}/)")
    p.add_argument("-v", "--verbose", action="store_true", help="log each step (and failures with tracebacks)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="MACs vs measured time: design-element sweeps, operator profiles, model sets",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--list", action="store_true", help="list the design-element pairs and exit")
    analyses = p.add_subparsers(dest="analysis", metavar="ANALYSIS", parser_class=type(p))

    e = analyses.add_parser(
        "elements",
        help="design-element pairs over a channels x resolution grid",
        description="Sweep design-element pairs over channels x resolution: MACs and interleaved timings per "
        "cell, heatmaps of time ratio | MAC ratio, CSV/JSON of every cell. A cell is cached once measured, "
        "so an interrupted run resumes when started again with the same options.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument("pairs", nargs="*", metavar="PAIR", help="pair names (default: all; see --list)")
    e.add_argument("--list", action="store_true", help="list the pairs and exit")
    e.add_argument("--mode", default="latency", choices=MODES, help="latency: batch 1 (default); throughput: large")
    e.add_argument("--batch-size", type=positive_int, metavar="N", help="throughput batch")
    e.add_argument("--channels", nargs="+", type=int_at_least(MIN_CHANNELS), metavar="C", help="default 16..512")
    e.add_argument("--resolutions", nargs="+", type=int_at_least(MIN_RESOLUTION), metavar="R", help="default 7..112")
    e.add_argument("--quick", action="store_true", help="small grid (16, 64 ch x 7, 14 px) and short timing")
    e.add_argument("--rounds", type=int_at_least(MIN_ROUNDS), metavar="N", help="interleaved rounds per cell")
    cap = e.add_mutually_exclusive_group()
    cap.add_argument("--max-gmacs", type=positive_float, metavar="G", help="skip cells above G GMACs per call (CPU: 4)")
    cap.add_argument("--no-mac-cap", action="store_true", help="measure every cell, however large")
    e.add_argument("--budget", type=non_negative_float, metavar="SECONDS", help="start no new cell after this long")
    e.add_argument("--name", metavar="STEM", help="file stem of the results (default elements-MODE)")
    e.add_argument("--cache-dir", metavar="DIR", help="cell cache (default OUT/cache)")
    e.add_argument("--no-cache", action="store_true", help="neither read nor write the cell cache")
    e.add_argument("--fresh", action="store_true", help="measure every cell again (overwrites the cache)")
    e.add_argument(
        "--import",
        dest="imports",
        action="append",
        metavar="MODULE",
        help="import a module or .py file first (one that calls register_pair); repeatable",
    )
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    _common(e)
    e.set_defaults(run=run)

    m = analyses.add_parser(
        "model",
        help="time per operator kind of one model, against its MAC share",
        description="Profile one model eagerly with torch.profiler: time per operator kind (dense, depthwise and "
        "transposed conv, linear, attention, norm, activation, reshape/copy, other) against its share of MACs.",
    )
    m.add_argument("model", help="our model name or timm:NAME")
    m.add_argument("--mode", default="latency", choices=MODES, help="latency: batch 1 (default); throughput: large")
    m.add_argument("--batch-size", type=positive_int, metavar="N", help="throughput batch")
    m.add_argument("--image-size", type=image_size, default=(224, 224), metavar="S|HxW", help="default 224")
    m.add_argument("--iters", type=positive_int, metavar="N", help="profiled calls (CPU 5, CUDA 20)")
    m.add_argument("--quick", action="store_true", help="short wall-clock timing (>= 3 calls, >= 0.5 s)")
    _common(m, backend=False)
    m.set_defaults(run=run)

    s = analyses.add_parser(
        "models",
        help="MACs vs measured latency and throughput across models",
        description="Time a model set (ours and timm:NAME) in throughput and latency mode; rank MACs against "
        "time (Spearman, Kendall) and plot them.",
    )
    s.add_argument("models", nargs="*", metavar="MODEL", help="our names or timm:NAME (default: the bench set)")
    s.add_argument("--batch-size", type=positive_int, metavar="N", help="throughput batch")
    s.add_argument("--image-size", type=image_size, default=(224, 224), metavar="S|HxW", help="default 224")
    s.add_argument("--reparam", action="store_true", help="reparameterise first (MobileOne, FastViT, RepViT, ours)")
    s.add_argument("--quick", action="store_true", help="short timing per configuration (>= 3 calls, >= 0.5 s)")
    s.add_argument(
        "--budget", type=non_negative_float, metavar="SECONDS", help="start no new configuration after this long"
    )
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    _common(s)
    s.set_defaults(run=run)
    p.set_defaults(run=run, parser=p)


def _list_pairs() -> None:
    for name in list_pairs():
        pair = get_pair(name)
        print(f"{name:<18}{pair.description}")
        for i, side in enumerate(pair.sides):
            role = "a" if i == 0 else chr(ord("a") + i)
            print(f"    {role}: {side.label:<14}{side.description}")


def _import(target: str) -> None:
    """Import a module by name or a .py file by path, so that its `register_pair` calls run."""
    try:
        if target.endswith(".py") or os.sep in target:
            path = Path(target)
            if not path.is_file():
                raise FileNotFoundError(f"--import {target}: no such file")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            importlib.import_module(target)
    except (ImportError, SyntaxError) as e:
        raise ValueError(f"--import {target}: {type(e).__name__}: {e}") from None


def _print_written(out: Path, written: list[Path]) -> None:
    """Write report.md of the folder (every result in it), then list what was written."""
    written.append(write_report(out))
    for path in written:
        print(f"wrote {path}")


def _raise_if_failed(statuses: list[str], what: str) -> None:
    failed = sum(status in ("error", "oom") for status in statuses)
    if failed:
        raise LowformerRuntimeError(f"{failed} of {len(statuses)} {what} failed (see the table above)")


def _run_elements(args: argparse.Namespace) -> int:
    for target in args.imports or []:
        _import(target)
    if args.list:
        _list_pairs()
        return 0
    if args.no_cache and (args.cache_dir or args.fresh):
        raise ValueError("--no-cache cannot be combined with --cache-dir or --fresh")
    out = Path(args.out)
    cache_dir = None if args.no_cache else Path(args.cache_dir) if args.cache_dir else out / "cache"
    sweep = plan_elements(
        args.pairs or None,
        channels=args.channels,
        resolutions=args.resolutions,
        device=args.device,
        mode=args.mode,
        batch_size=args.batch_size,
        precision=args.precision,
        backend=args.backend,
        channels_last=args.channels_last,
        threads=args.threads,
        rounds=args.rounds,
        quick=args.quick,
        max_gmacs=None if args.no_mac_cap else args.max_gmacs if args.max_gmacs is not None else "auto",
        budget_s=args.budget,
        cache_dir=cache_dir,
        fresh=args.fresh,
    )
    stem = args.name or f"elements-{args.mode}"
    files = [out / f"{stem}.csv", out / f"{stem}.json", out / REPORT_NAME]
    check_outputs(files + [out / f"{stem}_{p.name}.png" for p in sweep.pairs], folders=[out, cache_dir])
    print(sweep.describe(), flush=True)
    warn_if_busy(sweep.settings["device"], f"CPU timings are noisy; {_FAIR_RATIOS}")
    start = time.perf_counter()
    report = run_elements(sweep, progress=not args.no_progress and sys.stderr.isatty())
    data = report.to_dict()
    print()
    print(format_elements(data))
    counts = report.counts()
    cached = sum(c.cached for c in report.cells)
    parts = [f"{counts.get('ok', 0) - cached} measured", f"{cached} from the cache"]
    parts += [f"{n} {status}" for status, n in sorted(counts.items()) if status != "ok"]
    print(f"\n{len(report.cells)} cells: {', '.join(parts)}; took {time.perf_counter() - start:.0f} s")
    if report.stopped == "budget":
        print(f"time budget spent: {counts.get('not-run', 0)} cell(s) not run; run the same command to resume")
    elif report.stopped == "interrupted":
        print("interrupted: run the same command to resume (measured cells are cached)")
    written = [report.write_csv(out / f"{stem}.csv"), report.write_json(out / f"{stem}.json")]
    written += plot_element_heatmaps(data, out, stem=stem)
    _print_written(out, written)
    if report.stopped == "interrupted":
        raise KeyboardInterrupt  # exit 130, after the partial results are written
    _raise_if_failed([c.status for c in report.cells], "cell(s)")
    return 0


def _run_model(args: argparse.Namespace) -> int:
    out = Path(args.out)
    stem = f"profile-{safe_name(args.model)}-{args.mode}"
    files = [out / f"{stem}.json", out / f"{stem}.csv", out / f"{stem}.png"]
    check_outputs([*files, out / REPORT_NAME], folders=[out])
    device = resolve_device(args.device)
    print(f"profiling {args.model} on {device} ({args.mode}) ...", flush=True)
    warn_if_busy(device, f"CPU timings are noisy; {_USE_COMPARE}")
    profile = profile_model(
        args.model,
        device=device,
        mode=args.mode,
        batch_size=args.batch_size,
        image_size=args.image_size,
        precision=args.precision,
        channels_last=args.channels_last,
        threads=args.threads,
        iters=args.iters,
        quick=args.quick,
    )
    data = profile.to_dict()
    print(format_profile(data))
    written = [profile.write_json(files[0]), profile.write_csv(files[1]), plot_profile(data, files[2])]
    _print_written(out, written)
    return 0


def _run_models(args: argparse.Namespace) -> int:
    models_plan = plan_models(
        args.models or None,
        device=args.device,
        batch_size=args.batch_size,
        image_size=args.image_size,
        precision=args.precision,
        backend=args.backend,
        channels_last=args.channels_last,
        reparam=args.reparam,
        threads=args.threads,
        quick=args.quick,
    )
    out = Path(args.out)
    files = [out / "models.json", out / "models.csv", out / "models.png"]
    check_outputs([*files, out / REPORT_NAME], folders=[out])
    print(models_plan.describe(), flush=True)
    device = models_plan.settings["device"]
    warn_if_busy(device, f"CPU timings are noisy; {_USE_COMPARE}")
    report = run_models(models_plan, budget_s=args.budget, progress=not args.no_progress and sys.stderr.isatty())
    print()
    print(format_models(report.to_dict()))
    written = [report.write_json(files[0]), report.write_csv(files[1])]
    if any(r.ok and r.macs for r in report.bench.results):
        written.append(plot_models(report, files[2]))
    _print_written(out, written)
    _raise_if_failed([r.status for r in report.bench.results], "configuration(s)")
    return 0


def run(args: argparse.Namespace) -> int:
    if getattr(args, "verbose", False):
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
    if args.analysis is None:
        if args.list:
            _list_pairs()
            return 0
        args.parser.print_help()
        return 0
    return {"elements": _run_elements, "model": _run_model, "models": _run_models}[args.analysis](args)

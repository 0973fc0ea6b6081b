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

from ..bench import BACKENDS, MODES, PRECISIONS, TimingPolicy
from ..bench.presets import default_batch_size, default_timing
from ..factory import check_model_name
from ..measure.env import resolve_device
from ..report import format_elements, format_models, format_profile, plot_element_heatmaps, plot_models, plot_profile
from ._args import image_size

EXAMPLES = """examples:
  lowformer analyze --list
  lowformer analyze elements --quick                        # every pair, small grid, < 1 min on a CPU
  lowformer analyze elements fused-mbconv depthwise-conv --channels 16 32 64 128 --resolutions 14 28 56
  lowformer analyze elements --mode throughput --batch-size 32 --budget 600 --out results
  lowformer analyze model lowformer_b1 --mode throughput
  lowformer analyze models lowformer_b1 lowformer_e1 timm:fastvit_t8 timm:repvit_m1_1 timm:mobilenetv3_large_100
"""

DEFAULT_OUT = "analysis-results"


def _int_at_least(low: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be integers, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{what} must be >= {low}, got {value}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 seconds, got {value:g}")
    return value


def _gmacs(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of GMACs: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value:g}")
    return value


def _common(p: argparse.ArgumentParser, backend: bool = True) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS, help="fp32 = TF32 off; fp16/bf16 = autocast")
    if backend:
        p.add_argument("--backend", default="eager", choices=BACKENDS, help="default: eager")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--threads", type=_int_at_least(1, "threads"), metavar="N", help="intra-op CPU threads")
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
    e.add_argument("--batch-size", type=_int_at_least(1, "batch size"), metavar="N", help="throughput batch")
    e.add_argument("--channels", nargs="+", type=_int_at_least(8, "channels"), metavar="C", help="default 16..512")
    e.add_argument("--resolutions", nargs="+", type=_int_at_least(4, "resolutions"), metavar="R", help="default 7..112")
    e.add_argument("--quick", action="store_true", help="small grid (16, 64 ch x 7, 14 px) and short timing")
    e.add_argument("--rounds", type=_int_at_least(2, "rounds"), metavar="N", help="interleaved rounds per cell")
    cap = e.add_mutually_exclusive_group()
    cap.add_argument("--max-gmacs", type=_gmacs, metavar="G", help="skip cells above G GMACs per call (CPU: 4)")
    cap.add_argument("--no-mac-cap", action="store_true", help="measure every cell, however large")
    e.add_argument("--budget", type=_seconds, metavar="SECONDS", help="start no new cell after this long")
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
    m.add_argument("--batch-size", type=_int_at_least(1, "batch size"), metavar="N", help="throughput batch")
    m.add_argument("--image-size", type=image_size, default=(224, 224), metavar="S|HxW", help="default 224")
    m.add_argument("--iters", type=_int_at_least(1, "iters"), metavar="N", help="profiled calls (CPU 5, CUDA 20)")
    _common(m, backend=False)
    m.set_defaults(run=run)

    s = analyses.add_parser(
        "models",
        help="MACs vs measured latency and throughput across models",
        description="Time a model set (ours and timm:NAME) in throughput and latency mode; rank MACs against "
        "time (Spearman, Kendall) and plot them.",
    )
    s.add_argument("models", nargs="*", metavar="MODEL", help="our names or timm:NAME (default: the bench set)")
    s.add_argument("--batch-size", type=_int_at_least(1, "batch size"), metavar="N", help="throughput batch")
    s.add_argument("--image-size", type=image_size, default=(224, 224), metavar="S|HxW", help="default 224")
    s.add_argument("--reparam", action="store_true", help="reparameterise first (MobileOne, FastViT, RepViT, ours)")
    s.add_argument("--quick", action="store_true", help="short timing per configuration (>= 3 calls, >= 0.5 s)")
    s.add_argument("--budget", type=_seconds, metavar="SECONDS", help="start no new configuration after this long")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    _common(s)
    s.set_defaults(run=run)
    p.set_defaults(run=run, parser=p)


def _list_pairs() -> None:
    from ..analyze import get_pair, list_pairs

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


def _warn_if_busy(device: str, interleaved: bool) -> None:
    """CPU timings on a loaded machine are distorted (threads wait on each other): say so up front."""
    cpus = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if device.startswith("cuda") or load <= 0.5 * cpus:
        return
    if interleaved:
        consequence = "the interleaved rounds keep the ratios fair, the absolute times are not"
    else:
        consequence = "compare configurations with `lowformer bench --compare`, which interleaves them"
    print(f"  note: load average {load:.1f} on {cpus} CPUs: CPU timings are noisy; {consequence}", flush=True)


def _finish(out: Path, written: list[Path]) -> None:
    from ..report import write_report

    written.append(write_report(out))
    for path in written:
        print(f"wrote {path}")


def _run_elements(args: argparse.Namespace) -> int:
    import dataclasses

    from ..analyze import analyze_elements, default_element_timing, plan_cells
    from ..analyze.elements import resolve_pairs
    from ..analyze.sweep import DEFAULT_CHANNELS, DEFAULT_RESOLUTIONS, QUICK_CHANNELS, QUICK_RESOLUTIONS

    for target in args.imports or []:
        _import(target)
    if args.list:
        _list_pairs()
        return 0
    pairs = resolve_pairs(args.pairs or None)  # unknown names fail here, before anything runs
    device = resolve_device(args.device)
    if args.batch_size is not None and args.mode == "latency":
        raise ValueError("--batch-size applies to --mode throughput; latency mode is batch 1 by definition")
    if args.no_cache and (args.cache_dir or args.fresh):
        raise ValueError("--no-cache cannot be combined with --cache-dir or --fresh")
    timing = default_element_timing(device, args.quick)
    if args.rounds:
        timing = dataclasses.replace(timing, rounds=args.rounds)
    channels = args.channels or (QUICK_CHANNELS if args.quick else DEFAULT_CHANNELS)
    resolutions = args.resolutions or (QUICK_RESOLUTIONS if args.quick else DEFAULT_RESOLUTIONS)
    cells = plan_cells(pairs, channels, resolutions)
    out = Path(args.out)
    cache_dir = None if args.no_cache else Path(args.cache_dir) if args.cache_dir else out / "cache"
    max_gmacs = None if args.no_mac_cap else args.max_gmacs if args.max_gmacs is not None else "auto"
    batch = 1 if args.mode == "latency" else args.batch_size or default_batch_size(device)
    layout = "channels_last" if args.channels_last else "NCHW"
    print(
        f"{len(pairs)} pair(s) x {len(set(channels))} channels x {len(set(resolutions))} resolutions = "
        f"{len(cells)} cells on {device}; {args.mode} (batch {batch}), {args.backend} {args.precision} {layout}",
        flush=True,
    )
    print(f"  timing per cell: {timing.describe()}", flush=True)
    print(f"  cache: {cache_dir or 'off'}" + (f"; budget {args.budget:g} s" if args.budget is not None else ""))
    _warn_if_busy(device, interleaved=True)
    start = time.perf_counter()
    report = analyze_elements(
        pairs,
        channels=channels,
        resolutions=resolutions,
        device=device,
        mode=args.mode,
        batch_size=args.batch_size,
        precision=args.precision,
        backend=args.backend,
        channels_last=args.channels_last,
        threads=args.threads,
        timing=timing,
        quick=args.quick,
        max_gmacs=max_gmacs,
        budget_s=args.budget,
        cache_dir=cache_dir,
        fresh=args.fresh,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    print()
    print(format_elements(report.to_dict()))
    counts = report.counts()
    cached = sum(c.cached for c in report.cells)
    parts = [f"{counts.get('ok', 0) - cached} measured", f"{cached} from the cache"]
    parts += [f"{n} {status}" for status, n in sorted(counts.items()) if status != "ok"]
    print(f"\n{len(report.cells)} cells: {', '.join(parts)}; took {time.perf_counter() - start:.0f} s")
    if report.stopped == "budget":
        print(f"time budget spent: {counts.get('not-run', 0)} cell(s) not run; run the same command to resume")
    elif report.stopped == "interrupted":
        print("interrupted: run the same command to resume (measured cells are cached)")
    stem = args.name or f"elements-{args.mode}"
    written = [report.write_csv(out / f"{stem}.csv"), report.write_json(out / f"{stem}.json")]
    written += plot_element_heatmaps(report.to_dict(), out, stem=stem)
    _finish(out, written)
    if report.stopped == "interrupted":
        return 130
    return 1 if any(c.status in ("error", "oom") for c in report.cells) else 0


def _run_model(args: argparse.Namespace) -> int:
    from ..analyze import profile_model
    from ..analyze.profile import safe_name

    device = resolve_device(args.device)
    if args.batch_size is not None and args.mode == "latency":
        raise ValueError("--batch-size applies to --mode throughput; latency mode is batch 1 by definition")
    check_model_name(args.model)
    print(f"profiling {args.model} on {device} ({args.mode}) ...", flush=True)
    _warn_if_busy(device, interleaved=False)
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
    )
    print(format_profile(profile.to_dict()))
    out = Path(args.out)
    stem = f"profile-{safe_name(args.model)}-{args.mode}"
    written = [profile.write_json(out / f"{stem}.json"), profile.write_csv(out / f"{stem}.csv")]
    written.append(plot_profile(profile.to_dict(), out / f"{stem}.png"))
    _finish(out, written)
    return 0


def _run_models(args: argparse.Namespace) -> int:
    from ..analyze import analyze_models

    device = resolve_device(args.device)
    timing = None
    if args.quick:
        timing = TimingPolicy(warmup_iters=1, warmup_s=0.2, min_iters=3, min_s=0.5, max_s=5.0)
    models = args.models or None
    print(
        f"timing {len(models) if models else 'the default'} model(s) on {device}: throughput (batch "
        f"{args.batch_size or default_batch_size(device)}) and latency (batch 1), "
        f"{(timing or default_timing(device)).describe()}",
        flush=True,
    )
    _warn_if_busy(device, interleaved=False)
    report = analyze_models(
        models,
        device=device,
        batch_size=args.batch_size,
        image_size=args.image_size,
        precision=args.precision,
        backend=args.backend,
        channels_last=args.channels_last,
        reparam=args.reparam,
        threads=args.threads,
        timing=timing,
        budget_s=args.budget,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    print()
    print(format_models(report.to_dict()))
    out = Path(args.out)
    written = [report.write_json(out / "models.json"), report.write_csv(out / "models.csv")]
    if any(r.ok and r.macs for r in report.bench.results):
        written.append(plot_models(report, out / "models.png"))
    _finish(out, written)
    return 0 if all(r.status in ("ok", "skipped") for r in report.bench.results) else 1


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

"""`lowformer analyze`: counted MACs against measured time, on this device.

  elements   design-element pairs (fused vs unfused MBConv, depthwise vs dense conv, Lowtention vs
             MHSA vs none, attention stride, norms, activations, upsampling) over a channels x
             resolution grid: heatmaps of time ratio | MAC ratio, CSV/JSON of every cell
  calibrate  this device's measured ceilings (matmul FLOP/s, copy bandwidth, per-call overhead) and
             the latency model's per-kind factors, fitted on single operators (and, with
             --elements, refitted on element sweeps); cached
  model      where one model's time goes per operator kind, against its share of MACs, and every
             operator call on the roofline (FLOPs, bytes, intensity, achieved share, bound)
  predict    predicted time of models from their operators and the calibration, nothing timed
  models     MACs, parameters and the prediction vs measured latency and throughput across models

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

from .._io import write_json
from ..analyze import get_pair, list_pairs, plan_elements, plan_models, profile_model, run_elements, run_models
from ..analyze.element_fit import read_element_results, refine_on_results
from ..analyze.elements import MIN_CHANNELS, MIN_RESOLUTION
from ..analyze.latency import LatencyModel, cached_latency_model, latency_model_path
from ..analyze.models import MODEL_SETS, model_set
from ..analyze.predict import predict_models
from ..analyze.profile import check_profile_args, safe_name
from ..analyze.sweep import MIN_ROUNDS
from ..bench import BACKENDS, MODES, PRECISIONS
from ..errors import LowformerRuntimeError
from ..factory import check_model_name
from ..measure.calibrate import calibrated, calibration_dir, calibration_path, staleness
from ..measure.env import environment, keep_freed_memory, resolve_device
from ..measure.timing import CLOCKS, check_clock
from ..report import (
    format_calibration,
    format_elements,
    format_models,
    format_predictions,
    format_profile,
    format_roofline,
    plot_element_heatmaps,
    plot_models,
    plot_predictions,
    plot_profile,
    plot_roofline,
)
from ..report.markdown import CALIBRATION_SCHEMA, REPORT_NAME, write_report
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
  lowformer analyze calibrate                                # ceilings + latency model, < 1 min when quiet, cached
  lowformer analyze calibrate --elements results             # refit its factors on element sweeps in results/
  lowformer analyze model lowformer_b1 --mode throughput
  lowformer analyze predict lowformer_b1 timm:fastvit_t8 --batch-size 16
  lowformer analyze models lowformer_b1 lowformer_e1 timm:fastvit_t8 timm:repvit_m1_1 timm:mobilenetv3_large_100
  lowformer analyze models --set isomacs24                   # 24 models of similar MACs: MACs vs the prediction
  lowformer analyze models --set efficient24 --threads 1 --clock cpu --keep-memory
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


def _measuring(p: argparse.ArgumentParser, calibration: bool = True) -> None:
    """How time is taken (clock, allocator) and where the device's calibration is kept."""
    p.add_argument(
        "--clock",
        default="wall",
        choices=CLOCKS,
        help="wall (default), or cpu: the thread's CPU time, which a busy machine does not inflate (needs --threads 1)",
    )
    p.add_argument(
        "--keep-memory",
        action="store_true",
        help="keep freed memory in the process, as jemalloc/tcmalloc do: no page faults from glibc returning it",
    )
    if calibration:
        p.add_argument(
            "--calibration-dir",
            metavar="DIR",
            help="where calibrations are cached (default: $LOWFORMER_CALIBRATION_DIR, else "
            "~/.cache/lowformer/calibration)",
        )


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
    m.add_argument("--quick", action="store_true", help="short timing (>= 3 calls, >= 0.5 s) and a quick calibration")
    m.add_argument("--no-roofline", action="store_true", help="no roofline (needs no calibration)")
    _common(m, backend=False)
    _measuring(m)
    m.set_defaults(run=run)

    c = analyses.add_parser(
        "calibrate",
        help="this device's ceilings and the latency model's factors (cached)",
        description="Measure the ceilings of this device at this precision and thread count (dense matmul FLOP/s, "
        "copy bandwidth by size, per-call overhead of a tiny operator) and fit the latency model's per-kind "
        "factors on a sweep of single operators. Both are cached per device, precision, threads, clock and "
        "allocator mode; `analyze model`, `predict` and `models` use the cache.",
    )
    c.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    c.add_argument("--precision", default="fp32", choices=PRECISIONS, help="fp32 = TF32 off; fp16/bf16")
    c.add_argument("--threads", type=positive_int, metavar="N", help="intra-op CPU threads (default: torch's)")
    c.add_argument("--fresh", action="store_true", help="measure again, replacing the cached calibration")
    c.add_argument(
        "--quick", action="store_true", help="small sizes and a small operator sweep (seconds; a first look)"
    )
    c.add_argument(
        "--elements",
        nargs="+",
        metavar="PATH",
        help="refine the latency model on `analyze elements` results (their JSON files or folders), measured "
        "with the same device, precision and threads: one time scale per operator kind, cached with the model",
    )
    c.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"output directory (default {DEFAULT_OUT}/)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.add_argument("-v", "--verbose", action="store_true", help="log each step")
    _measuring(c)
    c.set_defaults(run=run)

    r = analyses.add_parser(
        "predict",
        help="predicted time of models from their operators and the calibration (nothing timed)",
        description="Predict the time per forward call of models (ours and timm:NAME) from every operator's FLOPs "
        "and bytes, counted on the meta device, and the device's calibration (`analyze calibrate`, run first if "
        "none is cached). Nothing is timed.",
    )
    r.add_argument("models", nargs="+", metavar="MODEL", help="our model names or timm:NAME")
    r.add_argument("--batch-size", type=positive_int, default=1, metavar="N", help="batch size (default 1)")
    r.add_argument("--image-size", type=image_size, default=(224, 224), metavar="S|HxW", help="default 224")
    r.add_argument("--device", default="auto", help="the device whose calibration to use: auto, cpu, cuda, cuda:N")
    r.add_argument("--precision", default="fp32", choices=PRECISIONS, help="fp32 = TF32 off; fp16/bf16")
    r.add_argument("--threads", type=positive_int, metavar="N", help="intra-op CPU threads (default: torch's)")
    r.add_argument("--quick", action="store_true", help="use (or make) a quick calibration")
    r.add_argument("--name", metavar="STEM", help="file stem of the results (default predict-bN)")
    r.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"output directory (default {DEFAULT_OUT}/)")
    r.add_argument("-v", "--verbose", action="store_true", help="log each step")
    _measuring(r)
    r.set_defaults(run=run)

    s = analyses.add_parser(
        "models",
        help="MACs vs measured latency and throughput across models",
        description="Time a model set (ours and timm:NAME) in throughput and latency mode; rank MACs against "
        "time (Spearman, Kendall) and plot them.",
    )
    s.add_argument("models", nargs="*", metavar="MODEL", help="our names or timm:NAME (default: --set bench)")
    s.add_argument(
        "--set",
        dest="model_set",
        choices=list(MODEL_SETS),
        help="a named model set: bench (the benchmark's 9 models, the default), efficient24 (ours and timm's "
        "efficient families, 24 models, 0.06-2.6 GMACs), isomacs24 (24 models of 0.75-1.45 GMACs, where MACs "
        "cannot rank them), isomacs24-large (24 others of 1.45-2.6 GMACs)",
    )
    s.add_argument("--rounds", type=positive_int, metavar="N", help="interleaved rounds per mode (default 5)")
    s.add_argument("--no-predict", action="store_true", help="no latency-model prediction (needs no calibration)")
    s.add_argument("--batch-size", type=positive_int, metavar="N", help="throughput batch")
    s.add_argument("--image-size", type=image_size, default=(224, 224), metavar="S|HxW", help="default 224")
    s.add_argument("--reparam", action="store_true", help="reparameterise first (MobileOne, FastViT, RepViT, ours)")
    s.add_argument("--quick", action="store_true", help="short timing (>= 3 calls, >= 0.5 s) and a quick calibration")
    s.add_argument(
        "--budget", type=non_negative_float, metavar="SECONDS", help="start no new configuration after this long"
    )
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    _common(s)
    _measuring(s)
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


def _calibration_folder(args: argparse.Namespace) -> Path:
    return Path(args.calibration_dir) if args.calibration_dir else calibration_dir()


def _latency_model(args: argparse.Namespace, device: str, fresh: bool = False) -> tuple[LatencyModel, bool]:
    """The cached calibration and latency model of these settings, made first when missing (said so:
    it takes a minute or two). Call inside `keep_freed_memory(args.keep_memory)`."""
    folder = _calibration_folder(args)
    path = calibration_path(device, args.precision, args.threads, args.clock, args.quick, folder)
    if fresh or not path.exists():
        print(f"calibrating {device} (ceilings, then the operator sweep; cached in {folder}) ...", flush=True)
    ceilings, cached = calibrated(
        device, args.precision, args.threads, args.clock, fresh=fresh, quick=args.quick, folder=folder
    )
    if cached:
        when, stale = staleness(ceilings)
        advice = "the machine may have changed since: measure again with `lowformer analyze calibrate --fresh`"
        print(f"using the cached calibration ({when})" + (f"; {advice}" if stale else ""), flush=True)
    progress = _progress_bar("operator sweep") if not getattr(args, "no_progress", False) else None
    try:
        return cached_latency_model(ceilings, fresh=fresh, folder=folder, progress=progress)
    finally:
        if progress is not None:
            progress.close()


class _progress_bar:
    """A progress callback (done, total) drawn with tqdm on a terminal, silent otherwise."""

    def __init__(self, desc: str, unit: str = "op") -> None:
        self.desc, self.unit = desc, unit
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if not sys.stderr.isatty():
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit=self.unit, dynamic_ncols=True)
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _check_measuring(args: argparse.Namespace, device: str) -> None:
    check_clock(args.clock, device, args.threads)
    if getattr(args, "calibration_dir", None) is not None:
        check_outputs([], folders=[args.calibration_dir])


def _run_calibrate(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    _check_measuring(args, device)
    out = Path(args.out)
    slug = f"{device.replace(':', '')}-{args.precision}" + ("-quick" if args.quick else "")
    target = out / f"calibration-{slug}.json"
    check_outputs([target, out / REPORT_NAME], folders=[out, _calibration_folder(args)])
    # read first: a wrong path is said before a calibration that takes a minute
    sweeps = read_element_results(args.elements) if args.elements else []
    start = time.perf_counter()
    with keep_freed_memory(args.keep_memory):
        model, cached = _latency_model(args, device, fresh=args.fresh)
    took = "from the cache" if cached else f"measured in {time.perf_counter() - start:.0f} s"
    path = latency_model_path(model.ceilings, _calibration_folder(args))
    if args.elements:
        print(f"refining on the element sweeps of {', '.join(args.elements)} ...", flush=True)
        progress = _progress_bar("element cells", unit="cell") if not args.no_progress else None
        try:
            model, _ = refine_on_results(model, sweeps, progress)
        finally:
            if progress is not None:
                progress.close()
        write_json(path, model.to_dict())
    data = model.to_dict()
    print(format_calibration(data["ceilings"], data))
    print(f"calibration {took}: {path}")
    record = {"schema": CALIBRATION_SCHEMA, "environment": environment(device), "latency_model": data}
    _print_written(out, [write_json(target, record)])
    return 0


def _run_model(args: argparse.Namespace) -> int:
    out = Path(args.out)
    stem = f"profile-{safe_name(args.model)}-{args.mode}"
    files = [out / f"{stem}.json", out / f"{stem}.csv", out / f"{stem}.png", out / f"{stem}-roofline.png"]
    check_model_name(args.model)  # before a calibration that may take minutes
    device = resolve_device(args.device)
    _check_measuring(args, device)
    check_profile_args(args.model, device, args.mode, args.batch_size, args.image_size, args.precision,
                       args.channels_last, args.iters, args.clock, args.threads)  # fmt: skip
    check_outputs([*files, out / REPORT_NAME], folders=[out])
    with keep_freed_memory(args.keep_memory):
        ceilings = None if args.no_roofline else _latency_model(args, device)[0].ceilings
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
            clock=args.clock,
            ceilings=ceilings,
        )
    data = profile.to_dict()
    print(format_profile(data))
    written = [profile.write_json(files[0]), profile.write_csv(files[1]), plot_profile(data, files[2])]
    if data.get("roofline"):
        print()
        print(format_roofline(data))
        written.append(plot_roofline(data, files[3]))
    _print_written(out, written)
    return 0


def _run_predict(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    _check_measuring(args, device)
    out = Path(args.out)
    stem = args.name or f"predict-b{args.batch_size}"
    files = [out / f"{stem}.json", out / f"{stem}.csv"]
    check_outputs([*files, out / REPORT_NAME], folders=[out])
    for name in args.models:  # before a calibration that may take minutes
        check_model_name(name)
    with keep_freed_memory(args.keep_memory):
        model, _ = _latency_model(args, device)
    report = predict_models(args.models, model, batch_size=args.batch_size, image_size=args.image_size)
    print(format_predictions(report.to_dict()))
    _print_written(out, [report.write_json(files[0]), report.write_csv(files[1])])
    return 0


def _run_models(args: argparse.Namespace) -> int:
    if args.model_set and args.models:
        raise ValueError("give model names or --set, not both")
    models = list(model_set(args.model_set)) if args.model_set else args.models or None
    models_plan = plan_models(
        models,
        device=args.device,
        batch_size=args.batch_size,
        image_size=args.image_size,
        precision=args.precision,
        backend=args.backend,
        channels_last=args.channels_last,
        reparam=args.reparam,
        threads=args.threads,
        rounds=args.rounds,
        quick=args.quick,
        clock=args.clock,
        keep_memory=args.keep_memory,
    )
    out = Path(args.out)
    files = [out / "models.json", out / "models.csv", out / "models.png", out / "models-predicted.png"]
    device = models_plan.settings["device"]
    _check_measuring(args, device)
    check_outputs([*files, out / REPORT_NAME], folders=[out])
    print(models_plan.describe(), flush=True)
    warn_if_busy(device, "CPU timings are noisy; the interleaved rounds keep the ranking fair, --clock cpu the times")
    latency_model = None
    if not args.no_predict:
        with keep_freed_memory(args.keep_memory):
            latency_model, _ = _latency_model(args, device)
    report = run_models(
        models_plan,
        budget_s=args.budget,
        progress=not args.no_progress and sys.stderr.isatty(),
        latency_model=latency_model,
    )
    data = report.to_dict()
    print()
    print(format_models(data))
    written = [report.write_json(files[0]), report.write_csv(files[1])]
    if any(r.ok and r.macs for r in report.bench.results):
        written.append(plot_models(report, files[2]))
    if any("spearman_predicted" in j for j in data["judgement"]):
        written.append(plot_predictions(data, files[3]))
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
    commands = {
        "elements": _run_elements,
        "calibrate": _run_calibrate,
        "model": _run_model,
        "predict": _run_predict,
        "models": _run_models,
    }
    return commands[args.analysis](args)

"""Design-element sweeps: MACs and measured time of every side of a pair over a channels x resolution grid.

For each cell (pair, channels, resolution):

1. every side is built on the meta device and counted (`count_macs`, 1 MAC = 1 fused multiply-add),
   which is instant even for cells too large to run;
2. a cell the pair rules out, or whose heaviest side exceeds the MAC cap, is skipped (a 2-core CPU
   would take minutes);
3. a cell measured before with the same settings comes from the cache;
4. otherwise the sides are built for real, prepared by the benchmark's backends (eager, compile,
   TorchScript, ONNX Runtime, CUDA graphs; precision; channels_last) and timed *interleaved*
   (`lowformer.measure.timing.interleave`): after one warm-up per side, each round times every side
   for a short burst, in alternating order (a b c, then c b a, ...), so that drifts of a busy
   machine hit all sides alike. A side's time is the median of all its calls; a ratio is the median
   of the per-round ratios, with their min/max.

Each measured cell is stored in a cache directory under a key of everything that affects it (pair
and its sides' module structure, channels, resolution, device, precision, backend, memory format,
mode, batch size, threads, timing, torch version), so an interrupted or budget-stopped sweep
resumes where it stopped when run again.

`plan_elements` checks the arguments and resolves the defaults, `run_elements` runs the plan, and
`analyze_elements` does both. The records are in `cells`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .._io import write_json
from ..bench.backends import BACKENDS, PRECISIONS, prepare, unsupported_reason
from ..bench.presets import default_batch_size
from ..measure import stats
from ..measure.env import environment, num_threads, resolve_device
from ..measure.macs import CONVENTION, count_macs
from ..measure.session import batch_size_for, check_modes, classify_failure, make_input, place, run_context
from ..measure.timing import Rounds, TimingPolicy, interleave
from .cells import CellResult, ElementReport, SideResult
from .elements import MIN_CHANNELS, MIN_RESOLUTION, ElementPair, resolve_pairs

_logger = logging.getLogger(__name__)

CACHE_SCHEMA = 1  # bump when the meaning of a cached cell changes
MIN_ROUNDS = 2  # a ratio per round needs at least two rounds to show a spread

DEFAULT_CHANNELS = (16, 32, 64, 128, 256, 512)
DEFAULT_RESOLUTIONS = (7, 14, 28, 56, 112)
QUICK_CHANNELS = (16, 64)
QUICK_RESOLUTIONS = (7, 14)

# Where tests replace the clock that the time budget reads.
_monotonic = time.monotonic


@dataclass(frozen=True)
class ElementTiming:
    """How one cell is timed: a warm-up per side (`warmup`'s warmup_* fields), then `rounds` rounds,
    each timing every side with `round` (its re-warm calls, then its timed calls)."""

    warmup: TimingPolicy
    round: TimingPolicy
    rounds: int = 5

    def __post_init__(self) -> None:
        if self.rounds < MIN_ROUNDS:
            raise ValueError(f"an interleaved cell needs at least {MIN_ROUNDS} rounds, got {self.rounds}")

    def to_dict(self) -> dict:
        return {"warmup": self.warmup.to_dict(), "round": self.round.to_dict(), "rounds": self.rounds}

    def as_rounds(self) -> Rounds:
        """The round policy of `lowformer.measure.timing.interleave` (slow sides get one call a round)."""
        return Rounds(self.rounds, burst=self.round, warmup=self.warmup, one_call_when_slow=True)

    def describe(self) -> str:
        w, r = self.warmup, self.round
        return (
            f"warm-up >= {w.warmup_iters} calls and >= {w.warmup_s:g} s per side, then {self.rounds} interleaved "
            f"rounds of >= {r.min_iters} calls and >= {r.min_s:g} s per side (1 call for a side slower than that)"
        )


def default_element_timing(device: str, quick: bool = False) -> ElementTiming:
    """Short bursts: a cell is many small modules, and the rounds, not long runs, beat the noise."""
    if device.startswith("cuda"):
        warmup = TimingPolicy(warmup_iters=10, warmup_s=0.2, min_iters=1, min_s=0.0)
        burst = TimingPolicy(warmup_iters=2, warmup_s=0.0, min_iters=10, min_s=0.05)
        return ElementTiming(warmup, burst, rounds=3 if quick else 7)
    if quick:
        warmup = TimingPolicy(warmup_iters=1, warmup_s=0.01, min_iters=1, min_s=0.0)
        return ElementTiming(warmup, TimingPolicy(0, 0.0, min_iters=3, min_s=0.01), rounds=3)
    warmup = TimingPolicy(warmup_iters=2, warmup_s=0.1, min_iters=1, min_s=0.0)
    return ElementTiming(warmup, TimingPolicy(0, 0.0, min_iters=3, min_s=0.05), rounds=5)


def default_max_gmacs(device: str) -> float | None:
    """MAC cap per call (all sides' heaviest, whole batch): a 2-core CPU does ~50 GMAC/s at best."""
    return None if device.startswith("cuda") else 4.0


# --------------------------------------------------------------------------------------------
# Grid, counting, cache
# --------------------------------------------------------------------------------------------


def check_grid(channels: Sequence[int], resolutions: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Sorted, de-duplicated axes; ValueError naming the bad value otherwise."""
    for name, values, low in (("channels", channels, MIN_CHANNELS), ("resolutions", resolutions, MIN_RESOLUTION)):
        if not values:
            raise ValueError(f"no {name} given")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name} must be integers, got {v!r}")
            if v < low:
                raise ValueError(f"{name} must be >= {low}, got {v}")
    return tuple(sorted(set(channels))), tuple(sorted(set(resolutions)))


def plan_cells(
    pairs: Sequence[ElementPair], channels: Sequence[int], resolutions: Sequence[int]
) -> list[tuple[ElementPair, int, int]]:
    """The sweep in run order: pair by pair, channels ascending, resolution ascending."""
    channels, resolutions = check_grid(channels, resolutions)
    return [(p, c, r) for p in pairs for c in channels for r in resolutions]


def _build(pair: ElementPair, channels: int, resolution: int, device: str | torch.device) -> list[nn.Module]:
    with torch.device(device):
        return [side.build(channels, resolution).eval() for side in pair.sides]


def count_sides(pair: ElementPair, channels: int, resolution: int) -> tuple[list[SideResult], str]:
    """MACs and parameters of every side at one cell, and a fingerprint of the sides' modules.

    Counted on the meta device (shapes only, no arithmetic), so a 100-GMAC cell costs nothing;
    a pair whose sides cannot be built or run there is counted on the CPU.
    """
    try:
        return _count_sides(pair, channels, resolution, "meta")
    except Exception:  # a user builder or forward that needs real tensors
        _logger.debug("%s: counting on the CPU (meta device failed)", pair.name, exc_info=True)
        return _count_sides(pair, channels, resolution, "cpu")


def _count_sides(pair: ElementPair, channels: int, resolution: int, device: str) -> tuple[list[SideResult], str]:
    modules = _build(pair, channels, resolution, device)
    sides = []
    for side, module in zip(pair.sides, modules):
        r = count_macs(module, (resolution, resolution), in_chans=channels, device=device)
        by_op = {k: v for k, v in r.by_op.items() if v}
        sides.append(SideResult(side.label, macs=r.macs, params=r.params, by_op=by_op))
    fingerprint = hashlib.sha256("\n".join(repr(m) for m in modules).encode()).hexdigest()[:16]
    return sides, fingerprint


class CellCache:
    """Measured cells on disk, one JSON file each, keyed by everything that affects the cell.

    Failed, skipped and unmeasured cells are not stored, so a later run tries them again.
    """

    def __init__(self, directory: str | Path | None, fresh: bool = False) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.fresh = fresh  # ignore what is stored (and overwrite it)

    @staticmethod
    def key(key_fields: dict) -> str:
        return hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:24]

    def _path(self, pair: str, channels: int, resolution: int, key: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{pair}-c{channels}-r{resolution}-{key}.json"

    def load(self, pair: str, channels: int, resolution: int, key: str) -> CellResult | None:
        if self.directory is None or self.fresh:
            return None
        path = self._path(pair, channels, resolution, key)
        try:
            data = json.loads(path.read_text())
            cell = CellResult.from_dict(data["cell"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:  # unreadable: measure again
            _logger.warning("ignoring unreadable cache file %s: %s", path, e)
            return None
        if cell.key != key or cell.status != "ok":
            return None
        cell.cached = True
        return cell

    def store(self, cell: CellResult, key_fields: dict) -> None:
        if self.directory is None or not cell.ok or cell.key is None:
            return
        path = self._path(cell.pair, cell.channels, cell.resolution, cell.key)
        write_json(path, {"key_fields": key_fields, "cell": cell.to_dict()})


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------


@dataclass
class ElementPlan:
    """The cells of a sweep in run order, how each is timed, and the resolved settings."""

    pairs: list[ElementPair]
    cells: list[tuple[ElementPair, int, int]]
    timing: ElementTiming
    threads: int | None  # as asked (None: torch's choice); settings["threads"] is what that gives
    cache_dir: Path | None
    fresh: bool
    settings: dict

    def describe(self) -> str:
        s = self.settings
        layout = "channels_last" if s["channels_last"] else "NCHW"
        budget = f"; budget {s['budget_s']:g} s" if s["budget_s"] is not None else ""
        return "\n".join(
            [
                f"{len(self.pairs)} pair(s) x {len(s['channels'])} channels x {len(s['resolutions'])} resolutions = "
                f"{len(self.cells)} cells on {s['device']}; {s['mode']} (batch {s['batch_size']}), "
                f"{s['backend']} {s['precision']} {layout}",
                f"  timing per cell: {self.timing.describe()}",
                f"  cache: {self.cache_dir or 'off'}{budget}",
            ]
        )


def plan_elements(
    pairs: Sequence[str | ElementPair] | None = None,
    *,
    channels: Sequence[int] | int | None = None,
    resolutions: Sequence[int] | int | None = None,
    device: str | None = "auto",
    mode: str = "latency",
    batch_size: int | None = None,
    precision: str = "fp32",
    backend: str = "eager",
    channels_last: bool = False,
    threads: int | None = None,
    timing: ElementTiming | None = None,
    rounds: int | None = None,
    quick: bool = False,
    max_gmacs: float | None | str = "auto",
    budget_s: float | None = None,
    cache_dir: str | Path | None = None,
    fresh: bool = False,
) -> ElementPlan:
    """Check the arguments of a sweep and resolve its defaults, without running it.

    Args:
        pairs: registered names or `ElementPair`s (default: every registered pair).
        channels, resolutions: grid axes (default 16-512 channels, 7-112 px; `quick`: 16, 64 x 7, 14).
        device: "auto", "cpu", "cuda", "cuda:N".
        mode: "latency" (batch 1) or "throughput" (`batch_size`, default 256 on CUDA, 16 on CPU).
        precision, backend, channels_last, threads: as for `lowformer bench`.
        timing: per-cell timing (default: `default_element_timing(device, quick)`); `rounds`
            replaces its number of rounds.
        max_gmacs: skip cells whose heaviest side needs more GMACs per call (whole batch); "auto":
            4 on CPU, no cap on CUDA; None: no cap.
        budget_s: stop starting new cells after this many seconds; the rest are "not-run".
        cache_dir: where measured cells are stored and looked up (None: no cache).
        fresh: measure every cell again, overwriting the cache.
    """
    pair_list = resolve_pairs(pairs)
    device = resolve_device(device)
    check_modes([mode])
    batch = batch_size_for(mode, batch_size, default_batch_size(device))
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    reason = unsupported_reason(backend, precision, device, channels_last)
    if reason is not None:
        raise ValueError(f"nothing to run: {reason}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if budget_s is not None and budget_s < 0:
        raise ValueError(f"the time budget must be >= 0 seconds, got {budget_s}")
    if max_gmacs == "auto":
        max_gmacs = default_max_gmacs(device)
    if max_gmacs is not None and max_gmacs <= 0:
        raise ValueError(f"the MAC cap must be > 0 GMACs, got {max_gmacs}")
    channels = _as_list(channels, QUICK_CHANNELS if quick else DEFAULT_CHANNELS)
    resolutions = _as_list(resolutions, QUICK_RESOLUTIONS if quick else DEFAULT_RESOLUTIONS)
    cells = plan_cells(pair_list, channels, resolutions)
    timing = timing or default_element_timing(device, quick)
    if rounds is not None:
        timing = ElementTiming(timing.warmup, timing.round, rounds)
    with num_threads(threads):
        used_threads = torch.get_num_threads()
    settings = {
        "pairs": [p.name for p in pair_list],
        "channels": sorted(set(channels)),
        "resolutions": sorted(set(resolutions)),
        "device": device,
        "mode": mode,
        "batch_size": batch,
        "precision": precision,
        "backend": backend,
        "channels_last": channels_last,
        "threads": used_threads,
        "timing": timing.to_dict(),
        "max_gmacs": max_gmacs,
        "budget_s": budget_s,
        "quick": quick,
        "cache_dir": str(cache_dir) if cache_dir is not None else None,
        "mac_convention": CONVENTION,
    }
    cache = Path(cache_dir) if cache_dir is not None else None
    return ElementPlan(pair_list, cells, timing, threads, cache, fresh, settings)


def _as_list(values: Sequence[int] | int | None, default: Sequence[int]) -> list[int]:
    if values is None:
        return list(default)
    return [values] if isinstance(values, int) else list(values)


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def run_elements(plan: ElementPlan, progress: bool = False) -> ElementReport:
    """Run a sweep cell by cell (see the module's docstring for the steps of one cell).

    A KeyboardInterrupt stops the sweep cleanly: the cells measured so far are kept (and cached),
    the rest are "not-run", and `report.stopped` is "interrupted".
    """
    start = _monotonic()
    report = ElementReport(environment=environment(plan.settings["device"]), settings=plan.settings, pairs=plan.pairs)
    cache = CellCache(plan.cache_dir, fresh=plan.fresh)
    bar = tqdm(total=len(plan.cells), desc="analyze", unit="cell", disable=not progress, dynamic_ncols=True)
    try:
        for pair, c, r in plan.cells:
            bar.set_postfix_str(f"{pair.name} C={c} R={r}", refresh=False)
            report.cells.append(_run_cell(pair, c, r, plan, report, cache, start))
            bar.update(1)
    except KeyboardInterrupt:
        report.stopped = "interrupted"
        for pair, c, r in plan.cells[len(report.cells) :]:
            report.cells.append(CellResult(pair.name, c, r, "not-run", _sides_or_none(pair, c, r), error="interrupted"))
    finally:
        bar.close()
    return report


def analyze_elements(
    pairs: Sequence[str | ElementPair] | None = None, *, progress: bool = False, **options
) -> ElementReport:
    """Sweep design-element pairs over a channels x resolution grid: MACs and interleaved timings.

    `options` are the keyword arguments of `plan_elements` (channels, resolutions, device, mode,
    batch_size, precision, backend, channels_last, threads, timing, rounds, quick, max_gmacs,
    budget_s, cache_dir, fresh); `progress` shows a progress bar (stderr). See `run_elements` for
    what a Ctrl-C keeps.
    """
    return run_elements(plan_elements(pairs, **options), progress=progress)


def _run_cell(
    pair: ElementPair, c: int, r: int, plan: ElementPlan, report: ElementReport, cache: CellCache, start: float
) -> CellResult:
    """Count, rule out, look up, check the budget, measure and store one cell."""
    try:
        sides, fingerprint = count_sides(pair, c, r)
    except Exception as e:  # a side that cannot even be built: recorded, the sweep goes on
        status, error = classify_failure(e)
        return CellResult(pair.name, c, r, status, sides=[], error=error)
    reason = pair.skip_reason(c, r) or _over_mac_cap(sides, plan.settings)
    if reason is not None:
        return CellResult(pair.name, c, r, "skipped", sides, error=reason)
    key_fields = _key_fields(pair, c, r, fingerprint, plan.settings, report.environment)
    key = CellCache.key(key_fields)
    cached = cache.load(pair.name, c, r, key)
    if cached is not None:
        return cached
    budget = plan.settings["budget_s"]
    if report.stopped == "budget" or (budget is not None and _monotonic() - start >= budget):
        report.stopped = "budget"
        return CellResult(pair.name, c, r, "not-run", sides, error=f"time budget of {budget:g} s spent", key=key)
    cell = CellResult(pair.name, c, r, "ok", sides, key=key)
    try:
        _measure_cell(pair, c, r, sides, plan)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # recorded; the sweep goes on
        cell.status, cell.error = classify_failure(e)
        _logger.info("%s C=%d R=%d: %s", pair.name, c, r, cell.error)
        _logger.debug("%s C=%d R=%d failed", pair.name, c, r, exc_info=True)
        return cell
    cache.store(cell, key_fields)
    return cell


def _over_mac_cap(sides: list[SideResult], settings: dict) -> str | None:
    heaviest = max(side.macs for side in sides) * settings["batch_size"]
    cap = settings["max_gmacs"]
    if cap is not None and heaviest > cap * 1e9:
        return f"over the MAC cap: {heaviest / 1e9:.1f} > {cap:g} GMACs per call"
    return None


def _sides_or_none(pair: ElementPair, c: int, r: int) -> list[SideResult]:
    try:
        return count_sides(pair, c, r)[0]
    except Exception:
        return []


def _key_fields(pair: ElementPair, c: int, r: int, fingerprint: str, settings: dict, env: dict) -> dict:
    """Everything that affects a measured cell: its cache key."""
    s = settings
    return {
        "cache_schema": CACHE_SCHEMA,
        "pair": pair.name,
        "pair_version": pair.version,
        "sides": pair.labels,
        "modules": fingerprint,
        "channels": c,
        "resolution": r,
        "device": s["device"],
        "device_name": env.get("device_name"),
        "precision": s["precision"],
        "backend": s["backend"],
        "channels_last": s["channels_last"],
        "mode": s["mode"],
        "batch_size": s["batch_size"],
        "threads": s["threads"],
        "timing": s["timing"],
        "torch": torch.__version__,
    }


# --------------------------------------------------------------------------------------------
# Timing one cell
# --------------------------------------------------------------------------------------------


def _measure_cell(
    pair: ElementPair, channels: int, resolution: int, sides: list[SideResult], plan: ElementPlan
) -> None:
    """Build the sides for real and fill in their times (in place)."""
    s = plan.settings
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same weights every run; speed does not depend on them
        modules = _build(pair, channels, resolution, "cpu")
    x = make_input((s["batch_size"], channels, resolution, resolution), "cpu")
    try:
        samples = time_sides(
            modules,
            x,
            plan.timing,
            device=s["device"],
            precision=s["precision"],
            backend=s["backend"],
            channels_last=s["channels_last"],
            threads=plan.threads,
        )
    finally:
        # NOTE: no gc.collect() per cell: modules hold no reference cycles, and a collection of this
        # process's heap (torch, matplotlib) costs more than timing a small cell
        del modules, x
        if s["device"].startswith("cuda"):
            torch.cuda.empty_cache()
    for side, rounds in zip(sides, samples):
        pooled = [t for burst in rounds for t in burst]
        summary = stats.summarize_ms(pooled, prefix="t")
        side.time_ms_p50, side.time_ms_p10, side.time_ms_p90 = summary["t_p50"], summary["t_p10"], summary["t_p90"]
        side.iterations = len(pooled)
        side.round_medians_ms = [stats.median(burst) * 1e3 for burst in rounds]


def time_sides(
    modules: Sequence[nn.Module],
    x: torch.Tensor,
    timing: ElementTiming,
    *,
    device: str,
    precision: str = "fp32",
    backend: str = "eager",
    channels_last: bool = False,
    threads: int | None = None,
) -> list[list[list[float]]]:
    """Time modules on the same input, interleaved; returns per module, per round, the call times (s).

    Round r visits the modules in order when r is even and in reverse when r is odd.
    """
    with run_context(device, precision, threads):
        x = place(x, device, channels_last)
        candidates = [
            prepare(place(m, device, channels_last), x, backend, precision, device, threads=threads).candidate(str(i))
            for i, m in enumerate(modules)
        ]
        times = interleave(candidates, timing.as_rounds())
    return [t.rounds for t in times]

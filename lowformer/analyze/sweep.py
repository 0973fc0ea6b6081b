"""Design-element sweeps: MACs and measured time of every side of a pair over a channels x resolution grid.

For each cell (pair, channels, resolution):

1. every side is built on the meta device and counted (`count_macs`, 1 MAC = 1 fused multiply-add),
   which is instant even for cells too large to run;
2. a cell whose heaviest side exceeds the MAC cap is skipped (a 2-core CPU would take minutes);
3. otherwise the sides are built for real, prepared by the benchmark's backends (eager, compile,
   TorchScript, ONNX Runtime, CUDA graphs; precision; channels_last) and timed *interleaved*: after
   one warm-up per side, each round times every side for a short burst, in alternating order
   (a b c, then c b a, ...), so that drifts of a busy machine hit all sides alike. A side's time is
   the median of all its calls; a ratio is the median of the per-round ratios, with their min/max.

Each measured cell is stored in a cache directory under a key of everything that affects it (pair
and its sides' module structure, channels, resolution, device, precision, backend, memory format,
mode, batch size, threads, timing, torch version), so an interrupted or budget-stopped sweep
resumes where it stopped when run again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .._io import write_csv, write_json
from ..bench.backends import BACKENDS, PRECISIONS, prepare, unsupported_reason
from ..bench.presets import default_batch_size
from ..measure import stats
from ..measure.env import environment, num_threads, resolve_device
from ..measure.macs import CONVENTION, count_macs
from ..measure.session import MODES, classify_failure, run_context
from ..measure.timing import TimingPolicy, measure
from .elements import MIN_CHANNELS, MIN_RESOLUTION, ElementPair, resolve_pairs

_logger = logging.getLogger(__name__)

SCHEMA = "lowformer.analyze.elements/1"
CACHE_SCHEMA = 1  # bump when the meaning of a cached cell changes

DEFAULT_CHANNELS = (16, 32, 64, 128, 256, 512)
DEFAULT_RESOLUTIONS = (7, 14, 28, 56, 112)
QUICK_CHANNELS = (16, 64)
QUICK_RESOLUTIONS = (7, 14)

# Ratios within this factor of 1 count as equal MACs (rounding in odd sizes, tiny side branches).
MAC_TIE = 1.02

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
        if self.rounds < 2:
            raise ValueError(f"an interleaved cell needs at least 2 rounds, got {self.rounds}")

    def to_dict(self) -> dict:
        return {"warmup": self.warmup.to_dict(), "round": self.round.to_dict(), "rounds": self.rounds}

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
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class SideResult:
    """One side of one cell. MACs are per image (batch 1); times are per call of the whole batch."""

    label: str
    macs: int
    params: int
    by_op: dict[str, int] = field(default_factory=dict)
    time_ms_p50: float | None = None
    time_ms_p10: float | None = None
    time_ms_p90: float | None = None
    iterations: int = 0
    round_medians_ms: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CellResult:
    """One (pair, channels, resolution) cell: every side's MACs and, when measured, its times.

    status: "ok", "error", "oom", "skipped" (over the MAC cap, or the pair's own check) or
    "not-run" (time budget spent, or interrupted; a later run measures it).
    """

    pair: str
    channels: int
    resolution: int
    status: str
    sides: list[SideResult]
    error: str | None = None
    cached: bool = False
    key: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict:
        return {
            "pair": self.pair,
            "channels": self.channels,
            "resolution": self.resolution,
            "status": self.status,
            "error": self.error,
            "cached": self.cached,
            "key": self.key,
            "sides": [s.to_dict() for s in self.sides],
        }

    @classmethod
    def from_dict(cls, d: dict) -> CellResult:
        return cls(
            pair=d["pair"],
            channels=d["channels"],
            resolution=d["resolution"],
            status=d["status"],
            error=d.get("error"),
            cached=d.get("cached", False),
            key=d.get("key"),
            sides=[SideResult(**s) for s in d["sides"]],
        )


ROW_COLUMNS = [
    "pair",
    "side_a",
    "side_b",
    "channels",
    "resolution",
    "status",
    "macs_a",
    "macs_b",
    "params_a",
    "params_b",
    "time_a_ms",
    "time_b_ms",
    "time_a_ms_p10",
    "time_a_ms_p90",
    "time_b_ms_p10",
    "time_b_ms_p90",
    "mac_ratio",
    "time_ratio",
    "time_ratio_min",
    "time_ratio_max",
    "mac_error",
    "cheaper_by_macs",
    "cheaper_by_time",
    "disagree",
    "rounds",
    "cached",
    "error",
    "mode",
    "batch_size",
    "device",
    "device_name",
    "precision",
    "backend",
    "channels_last",
]


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def comparison_row(cell: CellResult, a: SideResult, b: SideResult) -> dict:
    """One CSV row: side `a` (the pair's first) against side `b` in this cell.

    mac_ratio = macs(a) / macs(b) and time_ratio = median over rounds of time(a) / time(b); below 1
    means `a` is cheaper. cheaper_by_time names the side faster in *every* round ("tie" when the
    rounds disagree); disagree is true when MACs and time each pick a side and pick different ones.
    mac_error = time_ratio / mac_ratio: 1 when MACs predict the time ratio exactly.
    """
    row: dict = {
        "pair": cell.pair,
        "side_a": a.label,
        "side_b": b.label,
        "channels": cell.channels,
        "resolution": cell.resolution,
        "status": cell.status,
        "macs_a": a.macs,
        "macs_b": b.macs,
        "params_a": a.params,
        "params_b": b.params,
        "mac_ratio": _ratio(a.macs, b.macs),
        "cached": cell.cached,
        "error": cell.error,
    }
    mac_ratio = row["mac_ratio"]
    if mac_ratio is None:
        row["cheaper_by_macs"] = "tie" if a.macs == b.macs else None
    elif mac_ratio < 1 / MAC_TIE:
        row["cheaper_by_macs"] = a.label
    elif mac_ratio > MAC_TIE:
        row["cheaper_by_macs"] = b.label
    else:
        row["cheaper_by_macs"] = "tie"
    per_round = [ta / tb for ta, tb in zip(a.round_medians_ms, b.round_medians_ms) if tb > 0]
    if cell.ok and per_round:
        s = stats.ratio_summary(per_round)
        row.update(
            time_a_ms=a.time_ms_p50,
            time_b_ms=b.time_ms_p50,
            time_a_ms_p10=a.time_ms_p10,
            time_a_ms_p90=a.time_ms_p90,
            time_b_ms_p10=b.time_ms_p10,
            time_b_ms_p90=b.time_ms_p90,
            time_ratio=s["median"],
            time_ratio_min=s["min"],
            time_ratio_max=s["max"],
            rounds=len(per_round),
        )
        row["cheaper_by_time"] = a.label if s["max"] < 1 else b.label if s["min"] > 1 else "tie"
        row["mac_error"] = s["median"] / mac_ratio if mac_ratio else None
        decided = {row["cheaper_by_macs"], row["cheaper_by_time"]} - {"tie", None}
        row["disagree"] = len(decided) == 2
    return {k: row.get(k) for k in ROW_COLUMNS if k in row}


@dataclass
class ElementReport:
    """Every cell of a sweep, the settings it ran with and the environment it was measured in."""

    environment: dict
    settings: dict
    pairs: list[ElementPair]
    cells: list[CellResult] = field(default_factory=list)
    stopped: str | None = None  # "budget" or "interrupted" when cells were left unmeasured

    def rows(self) -> list[dict]:
        """One row per cell and compared side (a pair of three sides gives two rows per cell)."""
        return element_rows(self.to_dict())

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.cells:
            out[c.status] = out.get(c.status, 0) + 1
        return out

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "environment": self.environment,
            "settings": self.settings,
            "pairs": [pair_info(p) for p in self.pairs],
            "stopped": self.stopped,
            "cells": [c.to_dict() for c in self.cells],
        }

    def write_json(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    def write_csv(self, path: str | Path) -> Path:
        return write_csv(path, self.rows(), ROW_COLUMNS)

    def plot(self, out_dir: str | Path, stem: str = "elements", dpi: int = 100) -> list[Path]:
        """One heatmap figure per pair, `<stem>_<pair>.png` in `out_dir`."""
        from .plots import plot_pair_heatmaps

        return plot_pair_heatmaps(self.to_dict(), out_dir, stem=stem, dpi=dpi)

    def table(self) -> str:
        from .report import format_elements

        return format_elements(self.to_dict())


def element_rows(data: dict) -> list[dict]:
    """The comparison rows (CSV rows) of a sweep, from its dict form (`ElementReport.to_dict()` or
    the JSON file): for every cell, each side after the first against the first."""
    settings, env = data["settings"], data["environment"]
    shared = {k: settings.get(k) for k in ("mode", "batch_size", "device", "precision", "backend", "channels_last")}
    shared["device_name"] = env.get("device_name")
    labels = {p["name"]: [s["label"] for s in p["sides"]] for p in data["pairs"]}
    out = []
    for d in data["cells"]:
        cell = CellResult.from_dict(d)
        sides = {s.label: s for s in cell.sides}
        first, *others = labels[cell.pair]
        for other in others:
            if first in sides and other in sides:
                row = comparison_row(cell, sides[first], sides[other])
            else:  # the cell failed before its sides were counted
                row = {"pair": cell.pair, "side_a": first, "side_b": other, "channels": cell.channels}
                row.update(resolution=cell.resolution, status=cell.status, cached=False, error=cell.error)
            out.append({k: {**row, **shared}.get(k) for k in ROW_COLUMNS})
    return out


def pair_info(pair: ElementPair) -> dict:
    return {
        "name": pair.name,
        "description": pair.description,
        "claim": pair.claim,
        "version": pair.version,
        "sides": [{"label": s.label, "description": s.description} for s in pair.sides],
    }


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
# Timing one cell
# --------------------------------------------------------------------------------------------


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
        x = x.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        prepared = []
        for m in modules:
            m = m.to(device)
            if channels_last:
                m = m.to(memory_format=torch.channels_last)
            prepared.append(prepare(m, x, backend, precision, device, threads=threads))
        warm = TimingPolicy(timing.warmup.warmup_iters, timing.warmup.warmup_s, min_iters=1, min_s=0.0)
        bursts = []
        for p in prepared:
            m = measure(p.step, p.timer, warm)
            # NOTE: a side slower than a round's min_s gets one call per round (the rounds give it its
            # samples); faster sides get at least min_iters calls, so that one call stalled by another
            # process cannot become a round's median. Estimate: the faster of the timed call and the
            # warm-up mean, both of which can only overestimate.
            estimate = min(m.samples_s[0], m.warmup_s / max(m.warmup_iters, 1))
            slow = estimate >= timing.round.min_s
            bursts.append(
                dataclasses.replace(timing.round, min_iters=1, min_s=0.0, max_s=None) if slow else timing.round
            )
        samples: list[list[list[float]]] = [[] for _ in prepared]
        order = list(range(len(prepared)))
        for r in range(timing.rounds):
            for i in order if r % 2 == 0 else order[::-1]:
                m = measure(prepared[i].step, prepared[i].timer, bursts[i])
                samples[i].append(m.samples_s)
    return samples


def _measure_cell(pair: ElementPair, channels: int, resolution: int, sides: list[SideResult], s: dict) -> None:
    """Build the sides for real and fill in their times (in place)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same weights every run; speed does not depend on them
        modules = _build(pair, channels, resolution, "cpu")
        x = torch.randn(s["batch_size"], channels, resolution, resolution)
    try:
        samples = time_sides(
            modules,
            x,
            s["_timing"],
            device=s["device"],
            precision=s["precision"],
            backend=s["backend"],
            channels_last=s["channels_last"],
            threads=s["threads"],
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


# --------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------


def _as_list(values: Sequence[int] | int | None, default: Sequence[int]) -> list[int]:
    if values is None:
        return list(default)
    return [values] if isinstance(values, int) else list(values)


def analyze_elements(
    pairs: Sequence[str | ElementPair] | None = None,
    *,
    channels: Sequence[int] | None = None,
    resolutions: Sequence[int] | None = None,
    device: str | None = "auto",
    mode: str = "latency",
    batch_size: int | None = None,
    precision: str = "fp32",
    backend: str = "eager",
    channels_last: bool = False,
    threads: int | None = None,
    timing: ElementTiming | None = None,
    quick: bool = False,
    max_gmacs: float | None | str = "auto",
    budget_s: float | None = None,
    cache_dir: str | Path | None = None,
    fresh: bool = False,
    progress: bool = False,
) -> ElementReport:
    """Sweep design-element pairs over a channels x resolution grid: MACs and interleaved timings.

    Args:
        pairs: registered names or `ElementPair`s (default: every registered pair).
        channels, resolutions: grid axes (default 16-512 channels, 7-112 px; `quick`: 16, 64 x 7, 14).
        device: "auto", "cpu", "cuda", "cuda:N".
        mode: "latency" (batch 1) or "throughput" (`batch_size`, default 256 on CUDA, 16 on CPU).
        precision, backend, channels_last, threads: as for `lowformer bench`.
        timing: per-cell timing (default: `default_element_timing(device, quick)`).
        max_gmacs: skip cells whose heaviest side needs more GMACs per call (whole batch); "auto":
            4 on CPU, no cap on CUDA; None: no cap.
        budget_s: stop starting new cells after this many seconds; the rest are "not-run".
        cache_dir: where measured cells are stored and looked up (None: no cache).
        fresh: measure every cell again, overwriting the cache.
        progress: show a progress bar (stderr).

    A KeyboardInterrupt stops the sweep cleanly: the cells measured so far are kept (and cached),
    the rest are "not-run", and `report.stopped` is "interrupted".
    """
    start = _monotonic()
    pair_list = resolve_pairs(pairs)
    device = resolve_device(device)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if batch_size is not None and mode == "latency" and batch_size != 1:
        raise ValueError("a batch size applies to throughput mode; latency mode is batch 1 by definition")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    batch = 1 if mode == "latency" else batch_size or default_batch_size(device)
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
    env = environment(device)
    report = ElementReport(environment=env, settings=settings, pairs=pair_list)
    cache = CellCache(cache_dir, fresh=fresh)
    run_settings = {**settings, "threads": threads, "_timing": timing}
    bar = tqdm(total=len(cells), desc="analyze", unit="cell", disable=not progress, dynamic_ncols=True)
    try:
        for pair, c, r in cells:
            bar.set_postfix_str(f"{pair.name} C={c} R={r}", refresh=False)
            report.cells.append(_run_cell(pair, c, r, report, cache, run_settings, start))
            bar.update(1)
    except KeyboardInterrupt:
        report.stopped = "interrupted"
        done = len(report.cells)
        for pair, c, r in cells[done:]:
            try:
                sides, _ = count_sides(pair, c, r)
            except Exception:
                sides = []
            report.cells.append(CellResult(pair.name, c, r, "not-run", sides, error="interrupted"))
    finally:
        bar.close()
    return report


def _key_fields(pair: ElementPair, c: int, r: int, fingerprint: str, s: dict, env: dict) -> dict:
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
        "threads": torch.get_num_threads() if s["threads"] is None else s["threads"],
        "timing": s["timing"],
        "torch": torch.__version__,
    }


def _run_cell(
    pair: ElementPair, c: int, r: int, report: ElementReport, cache: CellCache, s: dict, start: float
) -> CellResult:
    try:
        sides, fingerprint = count_sides(pair, c, r)
    except Exception as e:  # a side that cannot even be built: recorded, the sweep goes on
        status, error = classify_failure(e)
        return CellResult(pair.name, c, r, status, sides=[], error=error)
    reason = pair.skip_reason(c, r)
    if reason is not None:
        return CellResult(pair.name, c, r, "skipped", sides, error=reason)
    heaviest = max(side.macs for side in sides) * s["batch_size"]
    cap = s["max_gmacs"]
    if cap is not None and heaviest > cap * 1e9:
        return CellResult(
            pair.name, c, r, "skipped", sides, error=f"over the MAC cap: {heaviest / 1e9:.1f} > {cap:g} GMACs per call"
        )
    key_fields = _key_fields(pair, c, r, fingerprint, s, report.environment)
    key = CellCache.key(key_fields)
    cached = cache.load(pair.name, c, r, key)
    if cached is not None:
        return cached
    budget = s["budget_s"]
    if report.stopped == "budget" or (budget is not None and _monotonic() - start >= budget):
        report.stopped = "budget"
        return CellResult(pair.name, c, r, "not-run", sides, error=f"time budget of {budget:g} s spent", key=key)
    cell = CellResult(pair.name, c, r, "ok", sides, key=key)
    try:
        _measure_cell(pair, c, r, sides, s)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # recorded; the sweep goes on
        cell.status, cell.error = classify_failure(e)
        _logger.info("%s C=%d R=%d: %s", pair.name, c, r, cell.error)
        _logger.debug("%s C=%d R=%d failed", pair.name, c, r, exc_info=True)
        return cell
    cache.store(cell, key_fields)
    return cell


def load_report(path: str | Path) -> dict:
    """An `elements.json` as written by `ElementReport.write_json` (plain dict, schema checked)."""
    data = json.loads(Path(path).read_text())
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not an element sweep (schema {data.get('schema')!r}, expected {SCHEMA!r})")
    return data

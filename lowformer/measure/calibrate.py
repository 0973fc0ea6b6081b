"""Measured ceilings of this device: what the roofline and the latency model hold every operator to.

Datasheet peaks say what silicon could do; what counts for an eager PyTorch forward pass is what this
device, this build of torch, this precision and (on a CPU) this many threads actually reach. Three
numbers, each measured in a few seconds:

- **compute**: dense matrix products (`torch.mm`, square, fp32 with TF32 off unless the precision is
  tf32, fp16/bf16 in that dtype), 2 n^3 FLOPs per call, the best of a few sizes;
- **bandwidth**: a copy of a buffer far larger than the last-level cache, bytes read + written per
  second; the same at smaller sizes gives the bandwidth an operator that touches fewer bytes sees
  (`Ceilings.bandwidth_at`: caches make small copies several times faster);
- **overhead**: the time of one call of a tiny operator (an add of two one-element tensors), the
  floor every operator call pays, launch or dispatch, before any arithmetic;
- **fresh pages** (CPU): what writing a newly allocated tensor larger than `FRESH_PAGES_ABOVE` costs
  per 4 KiB page beyond writing a reused one. glibc's malloc serves such blocks from new mappings on
  every allocation and returns them when freed, so each page of such an operator output is a page
  fault (2-3 us here); with freed memory kept (`keep_freed_memory`) or a caching allocator this is
  about 0.

Each is measured `repeats` times; the value is the median and `spread` the max/min ratio over the
repeats. `Ceilings.bound` classifies an operator by which of the three would bind it. Results are
cached per device, precision, thread count and torch version under `calibration_dir()`
(`$LOWFORMER_CALIBRATION_DIR`, else `$XDG_CACHE_HOME/lowformer/calibration`, else
`~/.cache/lowformer/calibration`); `calibrated(..., fresh=True)` measures again.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .._io import write_json
from . import stats
from .env import cpu_load, device_name, memory_mode
from .session import run_context
from .timing import PerfCounterTimer, ThreadCpuTimer, TimingPolicy, check_clock, device_timer, measure

_logger = logging.getLogger(__name__)

SCHEMA = "lowformer.measure.calibration/1"
CALIBRATION_ENV = "LOWFORMER_CALIBRATION_DIR"

PAGE_BYTES = 4096
# glibc's largest mmap threshold (32 MiB on 64-bit): larger blocks are always fresh mappings
FRESH_PAGES_ABOVE = 32 << 20
FRESH_PAGE_PROBE = 64 << 20

MATMUL_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BOUNDS = ("compute", "memory", "overhead")


@dataclass(frozen=True)
class CalibrationSizes:
    """What is timed: square matmul sizes, the copy's buffer size (bytes, each of source and
    destination), and how many tiny-op calls make one overhead sample."""

    matmul: tuple[int, ...]
    copy_bytes: int
    tiny_calls: int = 200
    repeats: int = 3
    small_copies: tuple[int, ...] = ()  # bytes of source + destination of the bandwidth curve's smaller copies

    def to_dict(self) -> dict:
        return asdict(self)


def default_sizes(device: str) -> CalibrationSizes:
    """Large enough to reach the ceilings: a copy 4x a 32 MiB L3 (CPU) or far past any GPU's L2."""
    if str(device).startswith("cuda"):
        curve = tuple(1 << k for k in range(22, 30, 2))  # 4 MiB .. 256 MiB
        return CalibrationSizes(matmul=(2048, 4096, 8192), copy_bytes=1 << 30, tiny_calls=1000, small_copies=curve)
    curve = tuple(1 << k for k in range(18, 27, 2))  # 256 KiB .. 64 MiB
    return CalibrationSizes(matmul=(256, 512, 1024), copy_bytes=128 << 20, tiny_calls=200, small_copies=curve)


def quick_sizes(device: str) -> CalibrationSizes:
    """A first look in a few seconds (and for tests): sizes that stay below the ceilings' reach."""
    if str(device).startswith("cuda"):
        return CalibrationSizes(matmul=(1024,), copy_bytes=64 << 20, tiny_calls=200, repeats=2, small_copies=(1 << 22,))
    return CalibrationSizes(matmul=(128,), copy_bytes=4 << 20, tiny_calls=50, repeats=2, small_copies=(1 << 18,))


@dataclass
class Ceilings:
    """Measured ceilings of one device, precision and thread count (see the module's docstring)."""

    device: str
    device_name: str
    precision: str
    threads: int | None  # intra-op CPU threads the ceilings were measured with (None on CUDA)
    clock: str  # "wall" or "cpu" (the thread's CPU time, see lowformer.measure.timing.ThreadCpuTimer)
    torch: str
    flops_per_s: float  # dense matmul
    bytes_per_s: float  # large copy, bytes read + written
    overhead_s: float  # one tiny operator call
    fresh_page_s: float = 0.0  # per 4 KiB page of a fresh allocation above FRESH_PAGES_ABOVE (0: not measured)
    memory: str = "default"  # the allocator mode measured under (lowformer.measure.env.memory_mode)
    bandwidth_curve: dict[str, float] = field(default_factory=dict)  # bytes moved per copy -> bytes/s
    spread: dict[str, float] = field(default_factory=dict)  # max/min over repeats, per ceiling
    details: dict = field(default_factory=dict)  # sizes, per-size values, how long it took
    date: str = ""

    @property
    def ridge(self) -> float:
        """The arithmetic intensity (FLOPs per byte) where the compute and bandwidth ceilings meet."""
        return self.flops_per_s / self.bytes_per_s

    def bandwidth_at(self, nbytes: float) -> float:
        """The bandwidth a copy of `nbytes` (read + written) reached: interpolated in log size on the
        measured curve, the large copy's beyond it, the smallest copy's below it."""
        points = sorted((float(k), v) for k, v in self.bandwidth_curve.items())
        points.append((2.0 * self.details.get("sizes", {}).get("copy_bytes", 0) or math.inf, self.bytes_per_s))
        if nbytes <= points[0][0]:
            return points[0][1]
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            if nbytes <= x1:
                if math.isinf(x1):
                    return y1
                w = math.log(nbytes / x0) / math.log(x1 / x0)
                return math.exp((1 - w) * math.log(y0) + w * math.log(y1))
        return self.bytes_per_s

    def fresh_pages_s(self, nbytes_written: float) -> float:
        """What an output of `nbytes_written` bytes costs in page faults: its 4 KiB pages at the
        measured `fresh_page_s` when it is larger than `FRESH_PAGES_ABOVE`, else nothing."""
        return self.fresh_page_s * nbytes_written / PAGE_BYTES if nbytes_written > FRESH_PAGES_ABOVE else 0.0

    def times(self, flops: float, nbytes: float) -> tuple[float, float]:
        """(compute time, memory time) in seconds of an operator at the ceilings."""
        return flops / self.flops_per_s, nbytes / self.bytes_per_s

    def bound(self, flops: float, nbytes: float) -> str:
        """What binds an operator at these ceilings: "overhead" when both its arithmetic and its
        traffic would take less than one call's overhead, else "compute" or "memory", whichever
        takes longer (the side of the ridge its intensity is on)."""
        compute_s, memory_s = self.times(flops, nbytes)
        if max(compute_s, memory_s) < self.overhead_s:
            return "overhead"
        return "compute" if compute_s >= memory_s else "memory"

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, **asdict(self), "ridge_flops_per_byte": self.ridge}

    @classmethod
    def from_dict(cls, d: dict) -> Ceilings:
        if d.get("schema") != SCHEMA:
            raise ValueError(f"not a calibration record (schema {d.get('schema')!r}, expected {SCHEMA})")
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in names})

    def describe(self) -> str:
        threads = f", {self.threads} thread{'s' * (self.threads != 1)}" if self.threads else ""
        threads += ", CPU-time clock" if self.clock == "cpu" else ""
        return (
            f"{self.device_name} ({self.device}{threads}), {self.precision}: compute {self.flops_per_s / 1e9:.1f} "
            f"GFLOP/s, bandwidth {self.bytes_per_s / 1e9:.1f} GB/s, overhead {self.overhead_s * 1e6:.1f} us per call, "
            f"fresh page {self.fresh_page_s * 1e6:.2f} us, ridge {self.ridge:.1f} FLOP/byte"
        )


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------

_POLICY = TimingPolicy(warmup_iters=1, warmup_s=0.05, min_iters=3, min_s=0.1, max_s=2.0)


def _median_s(step: Callable[[], object], timer, policy: TimingPolicy = _POLICY) -> float:
    return stats.median(measure(step, timer, policy).samples_s)


def _repeat(what: Callable[[], float], repeats: int) -> tuple[float, float, list[float]]:
    """(median, max/min spread, all values) of `repeats` measurements; the spread of values that
    are all 0 is 1, and of some 0s among others the number of repeats (a stand-in for "unbounded")."""
    values = [what() for _ in range(repeats)]
    low, high = min(values), max(values)
    spread = high / low if low > 0 else 1.0 if high == 0 else float(repeats)
    return stats.median(values), spread, values


def _matmul(n: int, dtype: torch.dtype, device: str) -> Callable[[], torch.Tensor]:
    """One n x n x n product of fixed random operands (2 n^3 FLOPs per call)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    return functools.partial(torch.mm, a, b)


def _matmul_rate(n: int, dtype: torch.dtype, device: str, timer) -> float:
    return 2 * n**3 / _median_s(_matmul(n, dtype, device), timer)


def compute_probe(ceilings: Ceilings) -> tuple[Callable[[], torch.Tensor], float]:
    """(step, FLOPs per call): the matmul these ceilings' compute figure was measured with, to measure
    it again beside other work. A shared machine's speed drifts; timed interleaved with models
    (`lowformer.analyze.models`), the probe says how fast the device computed while they ran, which
    is only part of what drifts (`benchmarks/speed_drift.py`)."""
    n = int(ceilings.details.get("matmul_size") or 0)
    if n < 1:
        raise ValueError("these ceilings do not record their matmul size; run `lowformer analyze calibrate` again")
    return _matmul(n, MATMUL_DTYPES[ceilings.precision], ceilings.device), 2.0 * n**3


def _copy_rate(nbytes: int, device: str, timer) -> float:
    """Bytes read + written per second by a copy of `nbytes` (source and destination `nbytes` each)."""
    src = torch.ones(max(nbytes // 4, 1), device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / _median_s(lambda: dst.copy_(src), timer)


def _fresh_page_cost(device: str, timer) -> float:
    """Seconds per 4 KiB page that filling a newly allocated `FRESH_PAGE_PROBE`-byte tensor costs
    beyond filling a reused one (0 where no more; 0 on CUDA, whose caching allocator reuses memory)."""
    if str(device).startswith("cuda"):
        return 0.0
    numel = FRESH_PAGE_PROBE // 4
    reused = torch.empty(numel)
    fresh = _median_s(lambda: torch.empty(numel).fill_(1.0), timer)
    again = _median_s(lambda: reused.fill_(1.0), timer)
    return max(fresh - again, 0.0) / (FRESH_PAGE_PROBE / PAGE_BYTES)


def _overhead(device: str, calls: int, clock: str) -> float:
    """Seconds per call of a tiny add, from a loop of `calls` calls (one call is too short to time)."""
    a = torch.ones(1, device=device)
    b = torch.ones(1, device=device)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else None
    timer = ThreadCpuTimer() if clock == "cpu" else PerfCounterTimer(sync=sync)

    def loop():
        for _ in range(calls):
            torch.add(a, b)

    return _median_s(loop, timer) / calls


def calibrate(
    device: str = "cpu",
    precision: str = "fp32",
    threads: int | None = None,
    clock: str = "wall",
    sizes: CalibrationSizes | None = None,
) -> Ceilings:
    """Measure the ceilings of `device` at `precision` with `threads` intra-op CPU threads (None:
    torch's choice) on `clock`, in the run context every timed call of the package uses."""
    check_clock(clock, device, threads)
    if precision not in MATMUL_DTYPES:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(MATMUL_DTYPES)}")
    cuda = str(device).startswith("cuda")
    if precision == "tf32" and not cuda:
        raise ValueError("tf32 is a CUDA tensor-core mode; on CPU use fp32 or bf16")
    sizes = sizes or default_sizes(device)
    start = time.perf_counter()
    with run_context(device, precision, threads):
        used_threads = None if cuda else torch.get_num_threads()
        timer = device_timer(device, clock)
        dtype = MATMUL_DTYPES[precision]
        per_size = {}
        for n in sizes.matmul:
            per_size[n] = _repeat(lambda n=n: _matmul_rate(n, dtype, device, timer), sizes.repeats)
        best = max(per_size, key=lambda n: per_size[n][0])
        flops, flops_spread, _ = per_size[best]
        bandwidth, bw_spread, _ = _repeat(lambda: _copy_rate(sizes.copy_bytes, device, timer), sizes.repeats)
        overhead, oh_spread, _ = _repeat(lambda: _overhead(device, sizes.tiny_calls, clock), sizes.repeats)
        fresh_page, page_spread, _ = _repeat(lambda: _fresh_page_cost(device, timer), sizes.repeats)
        curve = {
            str(2 * n): _repeat(lambda n=n: _copy_rate(n, device, timer), sizes.repeats)[0] for n in sizes.small_copies
        }
    return Ceilings(
        device=device,
        device_name=device_name(device),
        precision=precision,
        threads=used_threads,
        clock=clock,
        torch=torch.__version__,
        flops_per_s=flops,
        bytes_per_s=bandwidth,
        overhead_s=overhead,
        fresh_page_s=fresh_page,
        memory=memory_mode(),
        bandwidth_curve=curve,
        spread={
            "flops_per_s": flops_spread,
            "bytes_per_s": bw_spread,
            "overhead_s": oh_spread,
            "fresh_page_s": page_spread,
        },
        details={
            "load_avg_1m": None if cuda else cpu_load()[0],  # how busy the machine was (`staleness`)
            "sizes": sizes.to_dict(),
            "matmul_flops_per_s_by_size": {str(n): v[0] for n, v in per_size.items()},
            "matmul_size": best,
            "seconds": time.perf_counter() - start,
        },
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------


def calibration_dir() -> Path:
    """Where calibrations are kept: $LOWFORMER_CALIBRATION_DIR, else the user cache dir."""
    if os.environ.get(CALIBRATION_ENV):
        return Path(os.environ[CALIBRATION_ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "lowformer" / "calibration"


def cache_key(device: str, precision: str, threads: int | None, clock: str = "wall") -> dict:
    """Everything a calibration depends on besides the hardware's mood: device and its name,
    precision, CPU threads, clock, the allocator mode, torch version."""
    cuda = str(device).startswith("cuda")
    return {
        "device": device,
        "device_name": device_name(device),
        "precision": precision,
        "threads": None if cuda else threads,
        "clock": clock,
        "memory": memory_mode(),
        "torch": torch.__version__,
    }


def cache_path(key: dict, kind: str = "ceilings", folder: str | os.PathLike | None = None) -> Path:
    """The file of one cached record (`kind`: "ceilings", or an analysis' own, e.g. "latency-model")
    for a `cache_key`: readable name, hashed key."""
    name = f"{key['device_name']}-{key['precision']}-{key.get('clock', 'wall')}-{key.get('memory', 'default')}"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60]
    threads = f"-t{key['threads']}" if key.get("threads") else ""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(folder or calibration_dir()) / f"{kind}-{slug}{threads}-{digest}.json"


def read_cached(path: Path) -> dict | None:
    """A cached record, or None when absent or unreadable (then it is measured again)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        _logger.warning("ignoring unreadable calibration file %s: %s", path, e)
        return None


def calibrated(
    device: str = "cpu",
    precision: str = "fp32",
    threads: int | None = None,
    clock: str = "wall",
    *,
    fresh: bool = False,
    quick: bool = False,
    folder: str | os.PathLike | None = None,
) -> tuple[Ceilings, bool]:
    """(ceilings, whether they came from the cache): the cached calibration for this device,
    precision, thread count, clock and allocator mode, or a new one (then cached). `threads` None
    means torch's choice, resolved now, so that the cache key names the real count. `quick`: small
    sizes (`quick_sizes`), cached apart from the full calibration."""
    threads = _resolved_threads(device, threads)
    path = calibration_path(device, precision, threads, clock, quick, folder)
    if not fresh:
        data = read_cached(path)
        if data is not None and "fresh_page_s" not in data:
            _logger.info("calibration file %s predates the fresh-page cost; measuring again", path)
        elif data is not None:
            try:
                return Ceilings.from_dict(data), True
            except (TypeError, ValueError) as e:
                _logger.warning("ignoring calibration file %s: %s", path, e)
    ceilings = calibrate(device, precision, threads, clock, quick_sizes(device) if quick else None)
    ceilings.details["quick"] = quick
    write_json(path, ceilings.to_dict())
    return ceilings, False


STALE_HOURS = 12.0  # an older calibration may describe another state of the machine
STALE_LOAD_CHANGE = 1.0  # per CPU: a load that changed by more than this since calibrating


def staleness(ceilings: Ceilings, now: datetime.datetime | None = None) -> tuple[str, bool]:
    """(a line saying when and at what load `ceilings` were measured, whether to measure again).

    A calibration measures the machine as it was: on a CPU, other jobs lower every ceiling (a
    two-thread calibration at load 6 read 27 GFLOP/s where the quiet machine gives 198). Measure again
    when it is older than `STALE_HOURS` or the load per CPU changed by more than `STALE_LOAD_CHANGE`.
    """
    now = now or datetime.datetime.now(datetime.timezone.utc)
    parts, stale = [f"calibrated {ceilings.date or 'at an unknown time'}"], False
    try:
        hours = (now - datetime.datetime.fromisoformat(ceilings.date)).total_seconds() / 3600
    except (TypeError, ValueError):
        hours = None
    if hours is not None:
        parts.append(f"{hours:.1f} h ago")
        stale = hours > STALE_HOURS
    then, (load, cpus) = ceilings.details.get("load_avg_1m"), cpu_load()
    if then is not None and load is not None and not str(ceilings.device).startswith("cuda"):
        parts.append(f"at load {then:.1f}, now {load:.1f}")
        stale = stale or abs(load - then) / cpus > STALE_LOAD_CHANGE
    return ", ".join(parts), stale


def calibration_path(
    device: str,
    precision: str,
    threads: int | None,
    clock: str = "wall",
    quick: bool = False,
    folder: str | os.PathLike | None = None,
) -> Path:
    """Where `calibrated` keeps the ceilings of these settings."""
    threads = _resolved_threads(device, threads)
    return cache_path({**cache_key(device, precision, threads, clock), "quick": quick}, folder=folder)


def _resolved_threads(device: str, threads: int | None) -> int | None:
    """None means torch's choice on a CPU: the count it runs with now, which the cache key names."""
    if threads is None and not str(device).startswith("cuda"):
        return torch.get_num_threads()
    return threads

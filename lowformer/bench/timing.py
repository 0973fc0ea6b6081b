"""Timers and the timing loop shared by every backend and device.

A *timer* measures one call of a step function and returns seconds, with the device synchronised:
`PerfCounterTimer` (host clock; for CPU, and for backends that block until done, such as ONNX
Runtime) and `CudaEventTimer` (CUDA events recorded around the call on the current stream, then
synchronised, so the time is what the GPU took and nothing queued is left out).

`measure` runs a warm-up (at least `warmup_iters` calls *and* at least `warmup_s` seconds), then
timed calls until at least `min_iters` calls *and* `min_s` seconds are done; `max_iters` and
`max_s` cap the timed phase (`max_s` wins over `min_iters`, so a slow configuration on a busy
machine cannot hold a run for long). Every timed call is one sample; statistics are computed from
the samples (see `stats.py`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class TimingPolicy:
    """How long to warm up and how many calls to time. Both lower bounds of a phase must be met,
    unless a cap (`max_iters`, `max_s`: timed calls and seconds) is reached first."""

    warmup_iters: int = 2
    warmup_s: float = 1.0
    min_iters: int = 10
    min_s: float = 3.0
    max_iters: int = 100_000
    max_s: float | None = None

    def __post_init__(self) -> None:
        if self.warmup_iters < 0 or self.warmup_s < 0 or self.min_s < 0:
            raise ValueError(f"warm-up iterations and seconds must be >= 0: {self}")
        if self.min_iters < 1:
            raise ValueError(f"at least one timed iteration is needed, got min_iters={self.min_iters}")
        if self.max_iters < self.min_iters:
            raise ValueError(f"max_iters ({self.max_iters}) must be >= min_iters ({self.min_iters})")
        if self.max_s is not None and self.max_s < self.min_s:
            raise ValueError(f"max_s ({self.max_s}) must be >= min_s ({self.min_s})")

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        cap = f"at most {self.max_iters} iters" + (f" or {self.max_s:g} s" if self.max_s is not None else "")
        return (
            f"warm-up >= {self.warmup_iters} iters and >= {self.warmup_s:g} s, "
            f"then >= {self.min_iters} timed iters and >= {self.min_s:g} s ({cap})"
        )


class Timer(Protocol):
    name: str

    def time(self, fn: Callable[[], Any]) -> float: ...


class PerfCounterTimer:
    """Host wall clock around one call; `sync` (e.g. `torch.cuda.synchronize`) runs inside the interval."""

    name = "perf_counter"

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self.sync = sync

    def time(self, fn: Callable[[], Any]) -> float:
        start = time.perf_counter()
        fn()
        if self.sync is not None:
            self.sync()
        return time.perf_counter() - start


class CudaEventTimer:
    """CUDA events around one call, then wait for the end event: GPU time of that call in seconds.

    NOTE: the previous call's end event was synchronised, so each call starts on an idle GPU and
    the interval holds exactly this call's kernels (launch gaps included, as latency should).
    """

    name = "cuda_event"

    def __init__(self, event_factory: Callable[[], Any] | None = None) -> None:
        if event_factory is None:
            import torch

            def event_factory():
                return torch.cuda.Event(enable_timing=True)

        self._start, self._end = event_factory(), event_factory()

    def time(self, fn: Callable[[], Any]) -> float:
        self._start.record()
        fn()
        self._end.record()
        self._end.synchronize()
        return self._start.elapsed_time(self._end) / 1e3  # elapsed_time is in ms


@dataclass
class Measurement:
    """Raw result of `measure`: per-call seconds and how the warm-up went."""

    samples_s: list[float]
    warmup_iters: int
    warmup_s: float
    timed_s: float


def measure(
    fn: Callable[[], Any],
    timer: Timer,
    policy: TimingPolicy,
    before_timing: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Measurement:
    """Warm up `fn`, call `before_timing` (e.g. a barrier between concurrent jobs), then time it."""
    warmup_iters, start = 0, clock()
    while warmup_iters < policy.warmup_iters or clock() - start < policy.warmup_s:
        timer.time(fn)
        warmup_iters += 1
    warmup_s = clock() - start
    if before_timing is not None:
        before_timing()
    samples: list[float] = []
    start = clock()
    while len(samples) < policy.max_iters:
        elapsed = clock() - start
        if len(samples) >= policy.min_iters and elapsed >= policy.min_s:
            break
        if samples and policy.max_s is not None and elapsed >= policy.max_s:
            break
        samples.append(timer.time(fn))
    return Measurement(samples_s=samples, warmup_iters=warmup_iters, warmup_s=warmup_s, timed_s=clock() - start)

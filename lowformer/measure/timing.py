"""Timers, the timing loop, and the interleaved rounds: how every measurement of the package is taken.

A *timer* measures one call of a step function and returns seconds, with the device synchronised:
`PerfCounterTimer` (host clock; for CPU, and for backends that block until done, such as ONNX
Runtime), `CudaEventTimer` (CUDA events recorded around the call on the current stream, then
synchronised, so the time is what the GPU took and nothing queued is left out) and `ThreadCpuTimer`
(the calling thread's CPU time: single-threaded CPU runs on a machine busy with other work).

`measure` times one step: a warm-up (at least `warmup_iters` calls *and* at least `warmup_s`
seconds), then timed calls until at least `min_iters` calls *and* `min_s` seconds are done;
`max_iters` and `max_s` cap the timed phase (`max_s` wins over `min_iters`, so a slow configuration
on a busy machine cannot hold a run for long). Every timed call is one sample.

`interleave` times several *candidates* (prepared steps, each with its timer) against each other in
one process: a warm-up each, then rounds in which every candidate gets one short burst, in
alternating order (A B C, then C B A, ...), so that slow drifts of the machine (other load, clocks,
thermals) hit every candidate alike. Comparisons (`lowformer bench --compare`), design-element
sweeps (`lowformer analyze`) and deploy mode's layout tuner are all built on it; a comparison of
two candidates should be made per round, from round medians taken moments apart.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
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

    def override(self, given: Mapping[str, float | int | None], names: Mapping[str, str] | None = None) -> TimingPolicy:
        """This policy with the `given` fields (a None value counts as not given).

        A bound given alone moves the bound of this policy it would contradict, because what the user
        asked for wins over a default: a `min_s` above the default `max_s` lifts that cap, a `max_s`
        below the default `min_s` lowers that floor (likewise `min_iters` / `max_iters`). Two given
        bounds that contradict each other raise ValueError, naming both as `names` spells them (the
        CLI passes its flags, "--seconds"); unknown fields raise TypeError.
        """
        given = {k: v for k, v in given.items() if v is not None}
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(given) - fields)
        if unknown:
            raise TypeError(f"unknown timing field(s) {', '.join(unknown)}; expected {', '.join(sorted(fields))}")
        names = {**{f: f for f in fields}, **(names or {})}
        changes = dict(given)
        for low, high in (("min_iters", "max_iters"), ("min_s", "max_s")):
            lo, hi = changes.get(low, getattr(self, low)), changes.get(high, getattr(self, high))
            if hi is None or hi >= lo:
                continue
            if low in given and high in given:
                raise ValueError(f"{names[high]} ({hi:g}) must be >= {names[low]} ({lo:g})")
            if low in given:  # a longer floor lifts the default cap
                changes[high] = None if high == "max_s" else lo
            else:  # a shorter cap lowers the default floor
                changes[low] = hi
        return dataclasses.replace(self, **changes)


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


class ThreadCpuTimer:
    """CPU time of the calling thread around one call (`time.thread_time`): what a single-threaded CPU
    run costs, without the time the thread waited for a core.

    NOTE: on a machine shared with other work, the wall clock of a CPU run includes every moment the
    thread was descheduled (on a 2-core machine at load 6, several times the work itself); the thread's
    CPU time does not. It is latency only when the work runs on this thread alone, i.e. with one
    intra-op thread (`torch.set_num_threads(1)`), which `check_clock` enforces.
    """

    name = "thread_cpu_time"

    def time(self, fn: Callable[[], Any]) -> float:
        start = time.thread_time()
        fn()
        return time.thread_time() - start


CLOCKS = ("wall", "cpu")


def check_clock(clock: str, device: str, threads: int | None) -> None:
    """The CPU clock (`ThreadCpuTimer`) measures latency only for one intra-op thread on a CPU."""
    if clock not in CLOCKS:
        raise ValueError(f"unknown clock {clock!r}; choose from {', '.join(CLOCKS)}")
    if clock == "cpu":
        if str(device).startswith("cuda"):
            raise ValueError("the cpu clock times CPU runs; on CUDA use the wall clock (CUDA events)")
        if threads != 1:
            raise ValueError(
                "the cpu clock measures latency only with one intra-op thread: add --threads 1 (or use --clock wall)"
            )


def device_timer(device: str, clock: str = "wall") -> Timer:
    """The timer for a step that returns before its work is done: CUDA events on a GPU, else the host
    clock; with `clock` "cpu", the calling thread's CPU time (see `ThreadCpuTimer`)."""
    if clock == "cpu":
        return ThreadCpuTimer()
    return CudaEventTimer() if str(device).startswith("cuda") else PerfCounterTimer()


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


# --------------------------------------------------------------------------------------------
# Interleaved rounds
# --------------------------------------------------------------------------------------------


@dataclass
class Candidate:
    """One thing the rounds time: `step()` runs it once, `timer` measures a call, and `context()`
    (e.g. its threads and TF32 switch, `lowformer.measure.session.run_context`) is entered around
    its warm-up and each of its bursts, so candidates with different settings can share the rounds."""

    label: str
    step: Callable[[], Any]
    timer: Timer
    context: Callable[[], AbstractContextManager] = nullcontext


@dataclass(frozen=True)
class Rounds:
    """The round policy: a warm-up per candidate (`warmup`'s warmup_* fields, then one timed call
    that is kept as an estimate), then `count` rounds, each giving every candidate one `burst` (its
    re-warm calls, then its timed calls).

    With `one_call_when_slow`, a candidate whose call outlasts `burst.min_s` gets one call per round
    (the rounds give it its samples); faster ones get at least `burst.min_iters` calls, so that one
    call stalled by another process cannot become a round's median.
    """

    count: int
    burst: TimingPolicy
    warmup: TimingPolicy | None = None
    one_call_when_slow: bool = False

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"at least one round is needed, got {self.count}")


@dataclass
class CandidateTimes:
    """What `interleave` measured for one candidate. Times are seconds per call."""

    label: str
    rounds: list[list[float]] = field(default_factory=list)  # per round, the burst's call times
    warmup: Measurement | None = None
    error: BaseException | None = None  # why it left the rounds early (with keep_going)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def samples_s(self) -> list[float]:
        """Every timed call of every round."""
        return [t for burst in self.rounds for t in burst]

    @property
    def round_medians_s(self) -> list[float]:
        return [statistics.median(burst) for burst in self.rounds]

    @property
    def median_s(self) -> float | None:
        samples = self.samples_s
        return statistics.median(samples) if samples else None


def interleave(
    candidates: Sequence[Candidate],
    rounds: Rounds,
    *,
    keep_going: bool = False,
    on_burst: Callable[[int, int], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> list[CandidateTimes]:
    """Time `candidates` against each other, round by round; one `CandidateTimes` per candidate.

    Round r visits the candidates in order when r is even and in reverse when r is odd. With
    `keep_going`, a candidate that raises is recorded (`error`) and left out of later rounds (the
    rounds it finished stay comparable); otherwise the exception propagates. `on_burst(i, r)` is
    called after candidate i's burst in round r (a progress bar).
    """
    times = [CandidateTimes(c.label) for c in candidates]
    bursts = [_warm_up(c, t, rounds, keep_going, clock) for c, t in zip(candidates, times)]
    order = list(range(len(candidates)))
    for r in range(rounds.count):
        for i in order if r % 2 == 0 else order[::-1]:
            if not times[i].ok:
                continue
            try:
                with candidates[i].context():
                    m = measure(candidates[i].step, candidates[i].timer, bursts[i], clock=clock)
                times[i].rounds.append(m.samples_s)
            except Exception as e:
                if not keep_going:
                    raise
                times[i].error = e
            if on_burst is not None:
                on_burst(i, r)
    return times


def _warm_up(
    candidate: Candidate, times: CandidateTimes, rounds: Rounds, keep_going: bool, clock: Callable[[], float]
) -> TimingPolicy:
    """Warm `candidate` up (when the policy asks for it) and return the burst it gets in each round."""
    if rounds.warmup is None:
        return rounds.burst
    w = rounds.warmup
    try:
        with candidate.context():
            m = measure(candidate.step, candidate.timer, TimingPolicy(w.warmup_iters, w.warmup_s, 1, 0.0), clock=clock)
    except Exception as e:
        if not keep_going:
            raise
        times.error = e
        return rounds.burst
    times.warmup = m
    # both can only overestimate a call: the timed call, and the warm-up mean (which includes the first calls)
    estimate = min(m.samples_s[0], m.warmup_s / max(m.warmup_iters, 1))
    if rounds.one_call_when_slow and estimate >= rounds.burst.min_s:
        return dataclasses.replace(rounds.burst, min_iters=1, min_s=0.0, max_s=None)
    return rounds.burst

"""The measuring core (`lowformer.measure`): statistics, timers and the timing loop, the interleaved
rounds, the run context, modes and batch sizes, inputs, failure classification, the environment
record and the per-operator profiler. Timing assertions use sleeps, spins and fake clocks."""

from __future__ import annotations

import mmap
import os
import time
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from lowformer.measure import stats
from lowformer.measure.env import PeakMemory, cpu_load, is_busy, peak_tflops, resolve_device
from lowformer.measure.profiler import top_level_ops
from lowformer.measure.session import (
    LATENCY_BATCH_RULE,
    batch_size_for,
    batch_sizes_by_mode,
    classify_failure,
    frozen_heap,
    input_shape,
    make_input,
    mode_of,
    place,
    run_context,
)
from lowformer.measure.timing import (
    Candidate,
    CudaEventTimer,
    PerfCounterTimer,
    Rounds,
    TimingPolicy,
    interleave,
    measure,
)

# --------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------


def test_percentile_matches_linear_interpolation():
    values = [5, 1, 4, 2, 3, 10]
    # numpy.percentile(values, [10, 50, 90, 99]) with its default (linear) method
    expected = {10: 1.5, 50: 3.5, 90: 7.5, 99: 9.75}
    for q, want in expected.items():
        assert stats.percentile(values, q) == pytest.approx(want)
    assert stats.median([3.0]) == 3.0
    with pytest.raises(ValueError):
        stats.percentile([], 50)


def test_summarize_ms_names_units_and_values():
    s = stats.summarize_ms([0.001, 0.002, 0.003, 0.004])
    assert set(s) == {f"latency_ms_{k}" for k in ("p50", "p10", "p90", "p99", "min", "max", "mean", "std")}
    assert s["latency_ms_p50"] == pytest.approx(2.5)
    assert s["latency_ms_min"] == pytest.approx(1.0) and s["latency_ms_max"] == pytest.approx(4.0)
    assert s["latency_ms_std"] == pytest.approx(1.2909944, rel=1e-6)  # sample std of 1, 2, 3, 4


def test_rank_correlations_match_scipy():
    # reference values from scipy.stats.spearmanr / kendalltau (tau-b)
    assert stats.spearman([1, 2, 3, 4, 5, 6], [2, 1, 4, 3, 6, 5]) == pytest.approx(0.8285714285714287)
    assert stats.kendall([1, 2, 3, 4, 5, 6], [2, 1, 4, 3, 6, 5]) == pytest.approx(0.6)
    # with ties
    assert stats.rankdata([1, 2, 2, 3, 5]) == [1.0, 2.5, 2.5, 4.0, 5.0]
    assert stats.spearman([1, 2, 2, 3, 5], [3, 3, 1, 4, 9]) == pytest.approx(0.7631578947368421)
    assert stats.kendall([1, 2, 2, 3, 5], [3, 3, 1, 4, 9]) == pytest.approx(0.6666666666666666)
    assert stats.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert stats.spearman([1, 1, 1], [1, 2, 3]) is None  # undefined without variance


def test_ratio_summary():
    assert stats.ratio_summary([1.2, 0.9, 1.1, 1.0]) == {"min": 0.9, "median": pytest.approx(1.05), "max": 1.2}


# --------------------------------------------------------------------------------------------
# timers and the timing loop
# --------------------------------------------------------------------------------------------


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


@pytest.mark.parametrize("call, seconds", [(time.sleep, 0.020), (_spin, 0.010)], ids=["sleep20ms", "spin10ms"])
def test_timer_measures_a_known_time(call, seconds):
    m = measure(
        lambda: call(seconds), PerfCounterTimer(), TimingPolicy(warmup_iters=1, warmup_s=0, min_iters=20, min_s=0)
    )
    ms = [s * 1e3 for s in m.samples_s]
    want = seconds * 1e3
    assert min(ms) >= want  # never less than the known time
    assert stats.percentile(ms, 10) <= want * 1.05 + 1.0  # within 5% + 1 ms
    # the median too, up to one scheduler time slice: when every core is busy with other work, a
    # spinning call is sometimes preempted just before it ends
    assert stats.median(ms) <= want * 1.05 + 3.0, ms


def test_measure_follows_the_policy():
    now = [0.0]

    class StepTimer:  # every call takes exactly 0.1 s of a fake clock
        name = "fake"

        def time(self, fn):
            fn()
            now[0] += 0.1
            return 0.1

    def clock():
        return now[0]

    calls = []
    m = measure(lambda: calls.append(1), StepTimer(), TimingPolicy(2, 0.45, 3, 0.95, 1000), clock=clock)
    assert m.warmup_iters == 5  # 2 iterations were not enough; 0.45 s needed 5 calls
    assert len(m.samples_s) == 10  # 3 iterations were not enough; 0.95 s needed 10 calls
    m = measure(lambda: None, StepTimer(), TimingPolicy(0, 0.0, 3, 100.0, max_iters=4), clock=clock)
    assert m.warmup_iters == 0 and len(m.samples_s) == 4  # max_iters caps the time bound
    m = measure(lambda: None, StepTimer(), TimingPolicy(0, 0.0, 100, 0.0, max_s=0.35), clock=clock)
    assert len(m.samples_s) == 4  # max_s caps min_iters: stopped at the first check past 0.35 s
    with pytest.raises(ValueError):
        TimingPolicy(min_iters=0)
    with pytest.raises(ValueError):
        TimingPolicy(min_iters=10, max_iters=5)


def test_cuda_event_timer_logic_with_fake_events():
    class FakeEvent:  # stands in for torch.cuda.Event(enable_timing=True)
        def __init__(self):
            self.t, self.synced = None, False

        def record(self):
            self.t = time.perf_counter()

        def synchronize(self):
            self.synced = True

        def elapsed_time(self, end):  # milliseconds, as CUDA events report
            return (end.t - self.t) * 1e3

    timer = CudaEventTimer(event_factory=FakeEvent)
    seconds = timer.time(lambda: time.sleep(0.01))
    assert 0.01 <= seconds < 0.05
    assert timer._end.synced  # the end event is waited for before reading the time
    assert timer.name == "cuda_event"


# --------------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------------


def test_device_selection_and_peak_table():
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == (989.4, "table:H100 SXM")
    assert peak_tflops("NVIDIA H100 PCIe", "fp32") == (51.0, "table:H100 PCIe")
    assert peak_tflops("NVIDIA A10", "tf32")[1] == "table:A10"  # not the A100 row
    assert peak_tflops("Tesla T4", "bf16") == (None, None)
    assert peak_tflops("AMD EPYC", "fp32") == (None, None)


def _resident_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.mark.parametrize("reset_refused", [False, True], ids=["reset", "lifetime"])
def test_cpu_peak_memory_sees_an_allocation(reset_refused, monkeypatch):
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc (Linux)")
    if reset_refused:  # as in a container that forbids writing /proc/self/clear_refs
        real_open = open

        def refusing_open(path, *args, **kwargs):
            if str(path) == "/proc/self/clear_refs":
                raise PermissionError(13, "Permission denied")
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr("builtins.open", refusing_open)
    memory = PeakMemory("cpu")
    memory.reset()
    before, source = memory.read()
    # 64 MiB of fresh pages, touched: an anonymous mapping never reuses memory the allocator still holds
    block = mmap.mmap(-1, 64 * 2**20)
    block.write(b"\1" * len(block))
    after, _ = memory.read()
    resident = _resident_mib()  # includes the block
    block.close()
    assert after >= before and after >= resident - 1  # a peak is never below what is resident now
    if source == "proc_vmhwm":  # reset to what was resident: the block must raise it
        assert after - before >= 60
    else:  # a lifetime peak cannot be reset: an earlier, higher peak may hide the block
        assert source == "proc_vmhwm_lifetime"


# --------------------------------------------------------------------------------------------
# timing policy overrides (what the CLI's timing flags do)
# --------------------------------------------------------------------------------------------


def test_override_moves_a_contradicted_default_and_refuses_a_contradiction():
    base = TimingPolicy(warmup_iters=2, warmup_s=1.0, min_iters=10, min_s=3.0, max_s=15.0)
    assert base.override({"min_s": 20.0}).max_s is None  # a longer floor lifts the default cap
    assert base.override({"max_s": 2.0}) == TimingPolicy(2, 1.0, 10, 2.0, max_s=2.0)  # a shorter cap lowers it
    assert base.override({"max_iters": 4}).min_iters == 4
    assert base.override({"min_iters": 200_000}).max_iters == 200_000
    assert base.override({"min_s": None, "warmup_iters": 5}) == TimingPolicy(5, 1.0, 10, 3.0, max_s=15.0)
    flags = {"min_s": "--seconds", "max_s": "--max-seconds", "min_iters": "--iters", "max_iters": "--max-iters"}
    with pytest.raises(ValueError, match=r"^--max-seconds \(2\) must be >= --seconds \(5\)$"):
        base.override({"min_s": 5.0, "max_s": 2.0}, names=flags)
    with pytest.raises(ValueError, match=r"--max-iters \(3\) must be >= --iters \(9\)"):
        base.override({"min_iters": 9, "max_iters": 3}, names=flags)
    with pytest.raises(TypeError, match="unknown timing field"):
        base.override({"seconds": 1.0})


# --------------------------------------------------------------------------------------------
# interleaved rounds
# --------------------------------------------------------------------------------------------


class _FakeTimer:
    """Every call "takes" `seconds` of a fake clock; calls are logged by label."""

    name = "fake"

    def __init__(self, clock: list[float], log: list[str], label: str, seconds: float) -> None:
        self.clock, self.log, self.label, self.seconds = clock, log, label, seconds

    def time(self, fn):
        fn()
        self.log.append(self.label)
        self.clock[0] += self.seconds
        return self.seconds


def _candidates(seconds: dict[str, float], log: list[str], clock: list[float], fail=None):
    def step(label):
        def run():
            if fail and fail(label):
                raise RuntimeError(f"{label} broke")

        return run

    return [Candidate(k, step(k), _FakeTimer(clock, log, k, s)) for k, s in seconds.items()]


def test_interleave_alternates_the_order_round_by_round():
    clock, log = [0.0], []
    one = TimingPolicy(0, 0.0, min_iters=1, min_s=0.0)
    times = interleave(
        _candidates({"A": 0.1, "B": 0.2, "C": 0.3}, log, clock),
        Rounds(3, burst=one, warmup=one),
        clock=lambda: clock[0],
    )
    assert "".join(log) == "ABC" + "ABC" + "CBA" + "ABC"  # warm-ups, then A B C | C B A | A B C
    assert [t.label for t in times] == ["A", "B", "C"]
    assert [t.rounds for t in times] == [[[0.1]] * 3, [[0.2]] * 3, [[0.3]] * 3]
    assert times[1].round_medians_s == [0.2] * 3 and times[2].median_s == 0.3 and all(t.ok for t in times)
    assert times[0].warmup.samples_s == [0.1]


def test_interleave_gives_slow_candidates_one_call_per_round():
    clock, log = [0.0], []
    burst = TimingPolicy(1, 0.0, min_iters=3, min_s=0.5)
    rounds = Rounds(2, burst=burst, warmup=TimingPolicy(1, 0.0, 1, 0.0), one_call_when_slow=True)
    fast, slow = interleave(_candidates({"fast": 0.01, "slow": 1.0}, log, clock), rounds, clock=lambda: clock[0])
    assert [len(r) for r in slow.rounds] == [1, 1]  # slower than a burst's 0.5 s: one call a round
    assert all(len(r) >= 3 for r in fast.rounds) and sum(fast.rounds[0]) >= 0.5
    without = Rounds(2, burst=burst, warmup=TimingPolicy(1, 0.0, 1, 0.0))
    _, slow = interleave(_candidates({"fast": 0.01, "slow": 1.0}, log, clock), without, clock=lambda: clock[0])
    assert [len(r) for r in slow.rounds] == [3, 3]


def test_interleave_drops_a_failing_candidate_or_raises():
    clock, log, calls = [0.0], [], {"B": 0}

    def fail(label):
        if label == "B":
            calls["B"] += 1
            return calls["B"] == 3  # warm-up call, round 1, then breaks in round 2
        return False

    one = TimingPolicy(0, 0.0, min_iters=1, min_s=0.0)
    bursts = []
    a, b, c = interleave(
        _candidates({"A": 0.1, "B": 0.1, "C": 0.1}, log, clock, fail),
        Rounds(4, burst=one, warmup=one),
        keep_going=True,
        on_burst=lambda i, r: bursts.append((i, r)),
        clock=lambda: clock[0],
    )
    assert len(a.rounds) == len(c.rounds) == 4 and a.ok and c.ok
    assert len(b.rounds) == 1 and not b.ok and str(b.error) == "B broke"
    assert (1, 1) in bursts and (1, 2) not in bursts  # left out of the rounds after its failure
    calls["B"] = 0
    with pytest.raises(RuntimeError, match="B broke"):
        interleave(_candidates({"A": 0.1, "B": 0.1}, log, clock, fail), Rounds(4, burst=one, warmup=one))


def test_interleave_enters_each_candidates_context_around_its_bursts():
    entered = []

    @contextmanager
    def context():
        entered.append(torch.get_num_threads())
        yield

    one = TimingPolicy(0, 0.0, min_iters=1, min_s=0.0)
    candidate = Candidate("x", lambda: None, PerfCounterTimer(), context=context)
    (times,) = interleave([candidate], Rounds(3, burst=one, warmup=one))
    assert len(entered) == 1 + 3 and len(times.rounds) == 3


# --------------------------------------------------------------------------------------------
# run context, modes, inputs, failures
# --------------------------------------------------------------------------------------------


def test_run_context_sets_and_restores_the_switches():
    before = (torch.get_num_threads(), torch.is_grad_enabled(), torch.backends.cudnn.benchmark)
    with run_context("cpu", precision="tf32", threads=1, cudnn_benchmark=not before[2]):
        assert torch.get_num_threads() == 1 and not torch.is_grad_enabled()
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.benchmark != before[2]
    assert (torch.get_num_threads(), torch.is_grad_enabled(), torch.backends.cudnn.benchmark) == before
    with run_context("cpu"):
        assert not torch.backends.cuda.matmul.allow_tf32  # fp32 means TF32 off


def test_latency_is_batch_1_in_one_place():
    assert batch_sizes_by_mode(["throughput", "latency"], [8, 8, 16], [4]) == {
        "throughput": (8, 16),
        "latency": (1,),
    }
    assert batch_sizes_by_mode(["throughput"], None, [4]) == {"throughput": (4,)}
    assert batch_size_for("latency", None, 16) == 1 and batch_size_for("throughput", None, 16) == 16
    assert batch_size_for("latency", 1, 16) == 1 and batch_size_for("throughput", 32, 16) == 32
    with pytest.raises(ValueError, match="latency mode is batch 1 by definition"):
        batch_size_for("latency", 8, 16)
    assert "--batch-size" in LATENCY_BATCH_RULE
    with pytest.raises(ValueError, match="unknown mode"):
        batch_size_for("fast", None, 16)
    with pytest.raises(ValueError, match="must be >= 1"):
        batch_sizes_by_mode(["throughput"], [0], [4])
    assert (mode_of(1), mode_of(16)) == ("latency", "throughput")


def test_input_and_layout_preparation():
    model = nn.Conv2d(5, 4, 3)
    model.in_chans = 5
    assert input_shape(model, 2, (32, 48)) == (2, 5, 32, 48)
    assert input_shape(nn.Identity(), 1, (8, 8)) == (1, 3, 8, 8)
    x = make_input((2, 5, 8, 8), "cpu", channels_last=True)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x, make_input((2, 5, 8, 8), "cpu"))  # seeded: the same in every run
    assert place(model, "cpu", channels_last=True).weight.is_contiguous(memory_format=torch.channels_last)


def test_failures_are_classified_by_the_shared_rule():
    assert classify_failure(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")) == (
        "oom",
        "OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB",
    )
    assert classify_failure(MemoryError("cannot allocate"))[0] == "oom"
    assert classify_failure(RuntimeError("[enforce fail] can't allocate memory: you tried 9 GB"))[0] == "oom"
    assert classify_failure(RuntimeError("shapes do not match\nmore text")) == (
        "error",
        "RuntimeError: shapes do not match",
    )
    assert len(classify_failure(ValueError("x" * 2000))[1]) == 500


def test_frozen_heap_makes_collections_cheap_and_nests():
    import gc

    # Counts are compared with a margin: a frozen object still dies when its last reference goes
    # (another thread of the process may drop a few), but a second freeze would add 1000 and an
    # unfreeze would drop to 0.
    assert gc.get_freeze_count() == 0
    with frozen_heap():
        frozen = gc.get_freeze_count()
        assert frozen > 1000  # the heap alive before the block
        made_inside = [[] for _ in range(1000)]
        with frozen_heap():
            assert frozen - 100 < gc.get_freeze_count() < frozen + 1000  # the outer freeze, not a new one
        assert frozen - 100 < gc.get_freeze_count() < frozen + 1000  # still frozen after the inner block
        cycle = [nn.Linear(2, 2)]
        cycle.append(cycle)  # garbage created inside is still collected
        del cycle, made_inside
        assert gc.collect() >= 1
        assert frozen - 100 < gc.get_freeze_count() <= frozen
    assert gc.get_freeze_count() == 0


def test_busy_machine_rule():
    assert is_busy("cpu", 1.5, 2) and not is_busy("cpu", 0.9, 2)
    assert not is_busy("cuda", 100.0, 2) and not is_busy("cpu", None, 2)
    load, cpus = cpu_load()
    assert cpus >= 1 and (load is None or load >= 0)


# --------------------------------------------------------------------------------------------
# per-operator profiler
# --------------------------------------------------------------------------------------------


def test_top_level_ops_of_a_step():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(8, 4, 2, stride=2)).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        ops = top_level_ops(lambda: model(x), iters=2, device="cpu")
    names = [op.name for op in ops]
    assert names.count("aten::conv2d") == 2 and names.count("aten::relu") == 2  # top level only, per call
    assert not any(n in names for n in ("aten::convolution", "aten::mkldnn_convolution"))  # children left out
    conv = next(op for op in ops if op.name == "aten::conv2d")
    assert conv.input_shapes[0] == [1, 3, 8, 8] and conv.input_shapes[1] == [8, 3, 3, 3] and conv.time_us > 0

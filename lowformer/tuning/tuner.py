"""`lowformer.tune`: the fastest verified way to run a model on this machine, at one input shape and
precision.

Every candidate that can run here is built (deploy mode in a layout, then a backend: eager,
`torch.compile`, AOTInductor, ONNX Runtime, CUDA graphs; `lowformer.bench.backends.prepare`),
verified against the fp32 eager model on fresh random inputs, and timed against the others in
interleaved rounds (`lowformer.measure.timing.interleave`). The fastest verified candidate wins; a
candidate that cannot run here is reported as skipped with the reason, one that fails or
mismatches is reported as such, and neither is ever picked.

The steps, in order: `candidate_options` (what to try), `_Tuner.build` (deploy, prepare, verify:
one candidate), `_Tuner.time` (the rounds), `_Tuner.pick` (the winner by the objective's statistic).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..bench import backends
from ..deploy.mode import check_deployable, deploy, layouts
from ..errors import LowformerRuntimeError, VerificationError
from ..measure import stats
from ..measure.env import environment
from ..measure.session import classify_failure, make_input, run_context
from ..measure.timing import Rounds, TimingPolicy, interleave

_logger = logging.getLogger(__name__)

OBJECTIVES = ("throughput", "latency")
# max |candidate - reference| / max |reference| over fresh random inputs, against the fp32 eager
# model: fp32 allows for a different summation order (measured ~1e-6); TF32 keeps 10 mantissa bits,
# fp16 11 and bf16 8, and a deep network compounds their rounding.
TOLERANCES = {"fp32": 1e-4, "tf32": 1e-2, "fp16": 1e-2, "bf16": 5e-2}
VERIFY_SEED = 1000  # fresh inputs: seeds away from the timing input's (seed 0)
# candidates whose preparation compiles: the progress line says it will take a while
_SLOW = {"compile": "compiling", "aoti": "exporting and compiling", "onnxruntime": "exporting"}


@dataclass(frozen=True)
class Option:
    """One way to run a model: deploy mode in `layout`, then `backend` (with `compile_mode`)."""

    backend: str
    layout: str = "keep"
    compile_mode: str | None = None

    @property
    def name(self) -> str:
        """ "eager/packed", "compile/channels_last", "compile:max-autotune/contiguous", "onnxruntime"."""
        backend = self.backend if self.compile_mode is None else f"{self.backend}:{self.compile_mode}"
        return backend if self.layout == "keep" else f"{backend}/{self.layout}"

    @classmethod
    def parse(cls, name: str) -> Option:
        """The inverse of `name`. Raises ValueError for a malformed name."""
        m = re.fullmatch(r"([a-z_]+)(?::([a-z-]+))?(?:/([a-z_]+))?", name.strip())
        if m is None:
            raise ValueError(
                f"malformed candidate {name!r}; write BACKEND[:COMPILE_MODE][/LAYOUT], e.g. compile/channels_last"
            )
        backend, mode, layout = m.groups()
        return cls(backend, layout or "keep", mode)


def candidate_options(device_type: str) -> list[Option]:
    """Every candidate the tuner tries by default on a device type, in the order it builds them.

    CPU: eager deploy in each layout (packed oneDNN, channels_last, contiguous), `torch.compile` and
    AOTInductor (both with freezing) on channels_last and contiguous weights, ONNX Runtime.
    CUDA: eager and CUDA graphs in both layouts, `torch.compile` in its default, max-autotune and
    reduce-overhead (CUDA graphs) modes in both layouts, AOTInductor on channels_last, ONNX Runtime.
    """
    plain = ["channels_last", "contiguous"]
    options = [Option("eager", layout) for layout in layouts(device_type)]
    if device_type == "cuda":
        options += [Option("cudagraphs", layout) for layout in plain]
        for mode in (None, "max-autotune", "reduce-overhead"):
            options += [Option("compile", layout, mode) for layout in plain]
        options += [Option("aoti", "channels_last")]
    else:
        options += [Option("compile", layout) for layout in plain]
        options += [Option("aoti", layout) for layout in plain]
    return options + [Option("onnxruntime")]


def skip_reason(option: Option, device: str, precision: str) -> str | None:
    """Why `option` cannot run on `device` at `precision` (it is then reported as skipped), or None."""
    from ..bench.backends import BACKENDS, unsupported_reason

    if option.backend not in BACKENDS:
        raise ValueError(
            f"unknown backend {option.backend!r} in candidate {option.name!r}; choose from {', '.join(BACKENDS)}"
        )
    cuda = str(device).startswith("cuda")
    if option.layout not in ("keep", "packed", "channels_last", "contiguous"):
        raise ValueError(f"unknown layout {option.layout!r} in candidate {option.name!r}")
    if option.compile_mode is not None and option.backend != "compile":
        raise ValueError(f"{option.name!r}: a compile mode needs the compile backend")
    reason = unsupported_reason(option.backend, precision, device, channels_last=False)
    if reason is not None:
        return reason
    if option.layout == "packed" and (cuda or option.backend != "eager"):
        return "the packed oneDNN layout runs in eager mode on CPU (compilers and exporters trace the plain ops)"
    if option.backend == "compile" and not cuda and option.compile_mode not in (None, "default"):
        return f"compile mode {option.compile_mode} is for CUDA (autotuned GPU kernels, CUDA graphs)"
    if option.backend == "onnxruntime":
        try:
            import onnxruntime as ort
        except ImportError:
            return "onnxruntime is not installed (pip install 'lowformer[onnx]')"
        if cuda and "CUDAExecutionProvider" not in ort.get_available_providers():
            return "this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
    return None


@dataclass
class CandidateResult:
    """What the tuner found for one candidate. Times are ms per call of the whole input batch."""

    name: str
    backend: str
    layout: str
    compile_mode: str | None
    status: str = "ok"  # "ok", "skipped", "error" (failed), "oom", "mismatch" (above the tolerance)
    error: str | None = None  # the reason for a skip, the failure, or the error above the tolerance
    note: str | None = None  # the backend's note (compile options, ONNX Runtime provider)
    prepare_s: float | None = None  # deploy + build (trace, export, compile)
    max_rel_err: float | None = None  # against the fp32 eager model
    latency_ms_p50: float | None = None
    latency_ms_p10: float | None = None
    latency_ms_p90: float | None = None
    round_medians_ms: list[float] = field(default_factory=list)
    speedup_vs_eager: float | None = None  # median of per-round ratios against the first eager candidate

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.latency_ms_p50 is not None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TuneResult:
    """Every candidate's result, the winner, and what it takes to run the winner (`forward`)."""

    candidates: list[CandidateResult]
    settings: dict
    environment: dict
    best: CandidateResult | None = None
    prepared: dict = field(default_factory=dict, repr=False)  # name -> Prepared, for the winners kept

    @property
    def forward(self) -> Callable[[torch.Tensor], object]:
        """The winner as a function of an input of the tuned shape."""
        if self.best is None:
            raise LowformerRuntimeError(self.no_winner_reason())
        return self.prepared[self.best.name].run

    def fastest(self, backend: str) -> CandidateResult | None:
        """The fastest verified candidate of one backend (e.g. "aoti" for a .pt2 package)."""
        ok = [c for c in self.candidates if c.backend == backend and c.ok]
        return min(ok, key=lambda c: self._score(c)) if ok else None

    def _score(self, c: CandidateResult) -> float:
        return score(c, self.settings["objective"])

    def no_winner_reason(self) -> str:
        counts = {s: sum(c.status == s for c in self.candidates) for s in ("skipped", "error", "oom", "mismatch")}
        what = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        return f"no candidate ran and verified ({what}; see the table)"

    def to_dict(self) -> dict:
        return {
            "schema": "lowformer.tune/1",
            "environment": self.environment,
            "settings": self.settings,
            "best": self.best.name if self.best else None,
            "candidates": [c.to_dict() for c in self.candidates],
        }


def score(c: CandidateResult, objective: str) -> float:
    """What the objective minimises: the median call time for throughput, the 90th percentile (the
    time 9 in 10 calls stay under) for latency."""
    value = c.latency_ms_p50 if objective == "throughput" else c.latency_ms_p90
    return math.inf if value is None else value


def default_round_timing(device: str) -> TimingPolicy:
    """One candidate's burst in a round: a re-warm call, then at least 3 calls and 0.3 s (one call
    per round for a candidate slower than that: `Rounds.one_call_when_slow`)."""
    if str(device).startswith("cuda"):
        return TimingPolicy(warmup_iters=2, warmup_s=0.0, min_iters=20, min_s=0.2)
    return TimingPolicy(warmup_iters=1, warmup_s=0.0, min_iters=3, min_s=0.3)


def tune(
    model: nn.Module,
    example_input: torch.Tensor,
    precision: str = "fp32",
    objective: str = "throughput",
    *,
    candidates: Sequence[str | Option] | None = None,
    rounds: int = 5,
    round_timing: TimingPolicy | None = None,
    threads: int | None = None,
    verify_inputs: int = 2,
    tolerance: float | None = None,
    keep: Sequence[str] = ("aoti", "onnxruntime"),
    progress: Callable[[str], None] | None = None,
) -> TuneResult:
    """Find the fastest verified way to run `model` on `example_input`'s device, shape and `precision`.

    Args:
        model: an eval-mode model (ours, a timm model, any module deploy mode accepts); not changed.
        example_input: the input shape and device to tune for (compiled candidates are specialised
            to this shape); its values do not matter.
        precision: "fp32" (TF32 off), "tf32" (CUDA), "fp16" or "bf16" (autocast).
        objective: "throughput" picks the lowest median call time; "latency" the lowest 90th
            percentile.
        candidates: names as `Option.name` ("eager/packed", "compile/channels_last", "aoti/contiguous",
            "onnxruntime", "cudagraphs/channels_last", "compile:max-autotune/channels_last", ...).
            Default: `candidate_options(device type)`.
        rounds: interleaved rounds (each gives every candidate one burst of `round_timing`).
        threads: intra-op CPU threads for every candidate (ONNX Runtime's too); default torch's.
        verify_inputs: fresh random inputs each candidate is checked on.
        tolerance: the bound on the relative error; default `TOLERANCES[precision]`.
        keep: backends whose fastest verified candidate stays built besides the winner, for
            `write_package` (.pt2: "aoti", .onnx: "onnxruntime").
        progress: called with one line per step (each build can take tens of seconds); default logs.

    Returns:
        `TuneResult`: every candidate's status, error, prepare time and timings; `best` (None when
        no candidate ran and verified) and `forward`, the winner as a function.

    Raises:
        ValueError: bad arguments (objective, precision, candidate names, a model in training mode).
    """
    from ..bench.backends import PRECISIONS

    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if rounds < 1 or verify_inputs < 1:
        raise ValueError(f"rounds and verify_inputs must be >= 1, got {rounds} and {verify_inputs}")
    check_deployable(model)
    device = str(example_input.device)
    options = _options(candidates, example_input.device.type)
    settings = {
        "device": device,
        "input_shape": list(example_input.shape),
        "precision": precision,
        "objective": objective,
        "tolerance": TOLERANCES[precision] if tolerance is None else tolerance,
        "threads": threads or torch.get_num_threads(),
        "rounds": rounds,
        "verify_inputs": verify_inputs,
        "candidates": [o.name for o in options],
    }
    tuner = _Tuner(model, example_input, TuneResult([], settings, environment(device)), threads, progress)
    shape = "x".join(map(str, example_input.shape))
    tuner.say(f"tuning on {device}, input {shape}, {precision}, objective {objective}: {len(options)} candidates")
    for i, option in enumerate(options, 1):
        tuner.build(option, f"[{i}/{len(options)}] {option.name}")
    tuner.time(rounds, round_timing or default_round_timing(device))
    tuner.pick(keep)
    return tuner.result


def _options(candidates: Sequence[str | Option] | None, device_type: str) -> list[Option]:
    if candidates is None:
        return candidate_options(device_type)
    options = [c if isinstance(c, Option) else Option.parse(c) for c in candidates]
    names = [o.name for o in options]
    if not options or len(set(names)) != len(names):
        raise ValueError(f"candidates must be distinct and at least one, got {names}")
    return options


class _Tuner:
    """The state of one tuning: the reference outputs, the candidates built so far, the result."""

    def __init__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        result: TuneResult,
        threads: int | None,
        progress: Callable[[str], None] | None,
    ) -> None:
        self.model, self.x, self.result, self.threads = model, x, result, threads
        self.device = str(x.device)
        self.precision = result.settings["precision"]
        self.bound = result.settings["tolerance"]
        self.say = progress or _logger.info
        self.built: dict = {}  # name -> Prepared, the verified candidates
        with run_context(self.device, "fp32", threads):  # the reference: fp32, TF32 off, whatever is tuned
            self.references = _references(model, x, result.settings["verify_inputs"])
        result.settings["output_shapes"] = [list(t.shape) for t in self.references[0][1]]

    def context(self):
        """What every candidate runs under: threads, the TF32 switch, no autograd."""
        return run_context(self.device, self.precision, self.threads)

    def build(self, option: Option, tag: str) -> None:
        """Deploy, prepare and verify one candidate; keep it for timing if it verified."""
        from ..bench.backends import prepare

        entry = CandidateResult(option.name, option.backend, option.layout, option.compile_mode)
        self.result.candidates.append(entry)
        reason = skip_reason(option, self.device, self.precision)
        if reason is not None:
            entry.status, entry.error = "skipped", reason
            self.say(f"{tag}: skipped: {reason}")
            return
        if option.backend in _SLOW:
            self.say(f"{tag}: {_SLOW[option.backend]} (tens of seconds on a small CPU) ...")
        start = time.perf_counter()
        try:
            with self.context():
                # NOTE: every candidate gets the input as the caller has it: a conv follows its weight's
                # memory format, so converting the input is part of a layout's time
                deployed = deploy(self.model, memory_format=option.layout)
                args = (option.backend, self.precision, self.device, option.compile_mode, self.threads)
                prepared = prepare(deployed, self.x, *args)
                if self.x.device.type == "cuda":
                    torch.cuda.synchronize(self.x.device)
                entry.prepare_s = time.perf_counter() - start
                entry.note = prepared.note
                entry.max_rel_err = _max_rel_err(prepared.run, self.references)
        except Exception as e:  # recorded; the tuning goes on with the other candidates
            entry.status, entry.error = classify_failure(e)
            entry.prepare_s = time.perf_counter() - start
            _logger.debug("%s failed", option.name, exc_info=True)
            self.say(f"{tag}: failed after {entry.prepare_s:.1f} s: {entry.error}")
            return
        if not entry.max_rel_err <= self.bound:  # a NaN error fails too
            entry.status = "mismatch"
            entry.error = f"max relative error {entry.max_rel_err:.1e} > {self.bound:.0e} against the fp32 eager model"
            self.say(f"{tag}: MISMATCH: {entry.error}")
            return
        self.say(f"{tag}: ready in {entry.prepare_s:.1f} s, max rel err {entry.max_rel_err:.1e} <= {self.bound:.0e}")
        self.built[option.name] = prepared

    def time(self, rounds: int, burst: TimingPolicy) -> None:
        """Interleaved rounds over the verified candidates; their timings (or failure) into the result."""
        if not self.built:
            return
        names = list(self.built)
        self.say(f"timing {len(names)} verified candidates: {rounds} interleaved rounds ...")
        started = [0]  # rounds begun so far

        def on_burst(i: int, r: int) -> None:
            if r + 1 > started[0]:
                if r > 0:
                    self.say(f"  round {r}/{rounds} done")
                started[0] = r + 1

        candidates = [self.built[n].candidate(n, self.context) for n in names]
        warmup = TimingPolicy(warmup_iters=1, warmup_s=0.0, min_iters=1, min_s=0.0)
        policy = Rounds(rounds, burst=burst, warmup=warmup, one_call_when_slow=True)
        times = interleave(candidates, policy, keep_going=True, on_burst=on_burst)
        self.say(f"  round {rounds}/{rounds} done")
        entries = {c.name: c for c in self.result.candidates}
        for name, t in zip(names, times):
            entry = entries[name]
            if t.error is not None:
                entry.status, entry.error = classify_failure(t.error)
                continue
            ms = stats.summarize_ms(t.samples_s)
            entry.latency_ms_p50, entry.latency_ms_p10 = ms["latency_ms_p50"], ms["latency_ms_p10"]
            entry.latency_ms_p90 = ms["latency_ms_p90"]
            entry.round_medians_ms = [m * 1e3 for m in t.round_medians_s]
        eager = next((entries[n] for n in names if entries[n].backend == "eager" and entries[n].ok), None)
        for name in names:
            entry = entries[name]
            if eager is not None and entry.ok:
                ratios = [a / b for a, b in zip(eager.round_medians_ms, entry.round_medians_ms)]
                entry.speedup_vs_eager = stats.median(ratios) if ratios else None

    def pick(self, keep: Sequence[str]) -> None:
        """The winner by the objective; the candidates worth keeping stay built, the rest are freed."""
        result = self.result
        ok = [c for c in result.candidates if c.ok]
        result.best = min(ok, key=result._score) if ok else None
        wanted = {result.best.name} if result.best else set()
        for backend in keep:
            fastest = result.fastest(backend)
            if fastest is not None:
                wanted.add(fastest.name)
        result.prepared = {n: p for n, p in self.built.items() if n in wanted}
        self.built = {}
        if result.best is not None:
            self.say(f"best: {result.best.name}, {result.best.latency_ms_p50:.2f} ms per call (median)")
        else:
            self.say(result.no_winner_reason())


@torch.no_grad()
def _references(model: nn.Module, x: torch.Tensor, count: int) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """(input, fp32 eager outputs) on fresh random inputs of `x`'s shape: what candidates must match."""
    out = []
    for k in range(count):
        inp = make_input(tuple(x.shape), str(x.device), seed=VERIFY_SEED + k).to(x.dtype)
        out.append((inp, [t.float() for t in _tensors(model(inp))]))
    return out


@torch.no_grad()
def _max_rel_err(run: Callable, references: list) -> float:
    """max |out - ref| / max |ref| over every reference input and output; inf for a non-finite or
    missing output."""
    worst = 0.0
    for inp, expected in references:
        got = _tensors(run(inp))
        if len(got) != len(expected):
            return math.inf
        for ref, out in zip(expected, got):
            if ref.shape != out.shape:
                return math.inf
            diff = (ref - out.float().to(ref.device)).abs().nan_to_num(nan=math.inf, posinf=math.inf).max()
            worst = max(worst, float(diff) / max(float(ref.abs().max()), torch.finfo(torch.float32).tiny))
    return worst


def _tensors(out: object) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in out):
        return list(out)
    if isinstance(out, dict):
        return [t for t in out.values() if isinstance(t, torch.Tensor)]
    raise TypeError(f"the tuner compares tensor outputs, got {type(out).__name__}")


def require_best(result: TuneResult) -> CandidateResult:
    """The winner, or the error that says why there is none: `VerificationError` when candidates
    ran but none matched the reference, else `LowformerRuntimeError`."""
    if result.best is not None:
        return result.best
    if any(c.status == "mismatch" for c in result.candidates):
        raise VerificationError(result.no_winner_reason())
    raise LowformerRuntimeError(result.no_winner_reason())


# --------------------------------------------------------------------------------------------
# The benchmark's "tuned" backend
# --------------------------------------------------------------------------------------------

# rounds the tuner times its candidates in, inside a benchmark (which then times the winner itself)
TUNED_ROUNDS = 3


def prepare_tuned(model: nn.Module, x: torch.Tensor, precision: str, threads: int | None) -> backends.Prepared:
    """The fastest verified candidate `tune` finds for this model, input and precision, ready to time:
    what `lowformer bench --tuned` runs."""
    objective = "latency" if x.shape[0] == 1 else "throughput"
    result = tune(model, x, precision, objective, rounds=TUNED_ROUNDS, threads=threads, keep=())
    best = require_best(result)
    prepared = result.prepared[best.name]
    prepared.note = f"tuned: {best.name}" + (f" ({prepared.note})" if prepared.note else "")
    prepared.tuning = {k: v for k, v in result.to_dict().items() if k != "environment"}
    return prepared


backends.register_tuned(prepare_tuned)

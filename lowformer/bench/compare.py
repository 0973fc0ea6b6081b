"""Paired comparison: configurations interleaved round by round in one process.

Each round times every configuration for a short burst; the order alternates between rounds
(A B C, then C B A, ...) so that slow drifts of the machine (other load, clocks, thermals) hit
every configuration alike (`lowformer.measure.timing.interleave`). A pair's speedup is computed per
round, from the two round medians taken moments apart, and reported as min / median / max over
rounds: when even the minimum is above 1, the second configuration was faster in every round. This
is robust on noisy machines where two separate runs are not comparable.

`plan_compare` parses and checks the configurations, `run_compare` prepares and times them, and
`compare` does both.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from .._io import write_csv, write_json
from ..factory import check_image_size, check_model_name, model_source
from ..measure import stats
from ..measure.env import environment, resolve_device
from ..measure.session import classify_failure, mode_of
from ..measure.timing import Candidate, Rounds, TimingPolicy, interleave
from .backends import TUNED, unsupported_reason
from .models import build_source, check_task
from .planner import check_tuned
from .presets import default_image_size, default_round_timing, default_timing
from .result import BenchConfig
from .runner import config_context, inference_form, params_and_macs, prepare_config

SCHEMA = "lowformer.bench.compare/1"
MIN_ROUNDS = 2

# Options a comparison spec may set after "@": MODEL@backend=torchscript,channels_last
SPEC_OPTIONS: dict[str, type] = {
    "backend": str,
    "precision": str,
    "compile_mode": str,
    "channels_last": bool,
    "reparam": bool,
    "threads": int,
}


def _parse_bool(spec: str, key: str, value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{spec!r}: {key}={value!r} is not a boolean (use true or false)")


def parse_spec(spec: str, base: BenchConfig) -> BenchConfig:
    """ "MODEL[@key=value,...]" -> `base` with that model and those options.

    Keys: backend, precision, compile_mode, channels_last, reparam, threads. A bare boolean key
    ("@channels_last") means true.
    """
    name, _, options = spec.partition("@")
    name = name.strip()
    if not name:
        raise ValueError(f"{spec!r}: no model name before '@'")
    check_model_name(name)
    overrides: dict = {}
    for item in filter(None, (o.strip() for o in options.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        kind = SPEC_OPTIONS.get(key)
        if kind is None:
            raise ValueError(f"{spec!r}: unknown option {key!r}; a spec may set {', '.join(SPEC_OPTIONS)}")
        if kind is bool:
            overrides[key] = True if not eq else _parse_bool(spec, key, value)
        elif not eq or not value.strip():
            raise ValueError(f"{spec!r}: {key} needs a value ({key}=...)")
        elif kind is int:
            try:
                overrides[key] = int(value)
            except ValueError:
                raise ValueError(f"{spec!r}: {key}={value!r} is not an integer") from None
        else:
            overrides[key] = value.strip()
    config = dataclasses.replace(base, model=name, **overrides)
    if config.threads is not None and config.threads < 1:
        raise ValueError(f"{spec!r}: threads must be >= 1")
    if config.compile_mode is not None and config.backend != "compile":
        raise ValueError(
            f"{spec!r}: a compile mode (--compile-mode, @compile_mode=) needs the compile backend (@backend=compile)"
        )
    unsupported_reason(config.backend, config.precision, config.device, config.channels_last)  # name check
    if config.backend == TUNED:
        try:
            check_tuned(channels_last=config.channels_last, reparam=config.reparam)
        except ValueError as e:
            raise ValueError(f"{spec!r}: {e}") from None
    return config


@dataclass
class CompareEntry:
    """One configuration of a comparison and its timings over all rounds."""

    label: str
    config: BenchConfig
    source: str
    status: str = "ok"
    error: str | None = None
    reparam_applied: str | None = None
    params: int | None = None
    macs: int | None = None
    timer: str | None = None
    backend_note: str | None = None  # e.g. the compile options; for backend "tuned", the candidate picked
    tuning: dict | None = None  # backend "tuned": every candidate the tuner tried
    prepare_s: float | None = None  # for backend "tuned", the whole tuning
    round_medians_ms: list[float] = field(default_factory=list)
    samples_s: list[float] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def summary(self) -> dict:
        return stats.summarize_ms(self.samples_s) if self.samples_s else {}

    @property
    def latency_ms_p50(self) -> float | None:
        return self.summary().get("latency_ms_p50")

    @property
    def latency_ms_p10(self) -> float | None:
        return self.summary().get("latency_ms_p10")

    @property
    def latency_ms_p90(self) -> float | None:
        return self.summary().get("latency_ms_p90")

    @property
    def throughput_img_s(self) -> float | None:
        return self.config.batch_size / stats.median(self.samples_s) if self.samples_s else None

    def to_dict(self) -> dict:
        cfg = dataclasses.asdict(self.config)
        cfg["image_size"] = list(cfg["image_size"])
        return {
            "label": self.label,
            "config": cfg,
            "source": self.source,
            "status": self.status,
            "error": self.error,
            "reparam_applied": self.reparam_applied,
            "params": self.params,
            "macs": self.macs,
            "timer": self.timer,
            "backend_note": self.backend_note,
            "tuning": self.tuning,
            "prepare_s": self.prepare_s,
            "iterations": len(self.samples_s),
            **self.summary(),
            "throughput_img_s": self.throughput_img_s,
            "round_medians_ms": self.round_medians_ms,
        }


@dataclass
class PairResult:
    """Per-round speedup of `b` over `a`: time(a) / time(b); > 1 means b is faster."""

    a: str
    b: str
    a_tag: str
    b_tag: str
    rounds: int
    speedup_min: float
    speedup_median: float
    speedup_max: float
    verdict: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def pair_result(a: CompareEntry, b: CompareEntry, a_tag: str = "A", b_tag: str = "B") -> PairResult:
    """Speedups over the rounds both entries completed, and what they show."""
    ratios = [ta / tb for ta, tb in zip(a.round_medians_ms, b.round_medians_ms)]
    if not ratios:
        raise ValueError(f"{a.label} and {b.label} share no completed round")
    s = stats.ratio_summary(ratios)
    if s["min"] > 1:
        verdict = f"{b_tag} faster in every round"
    elif s["max"] < 1:
        verdict = f"{b_tag} slower in every round"
    else:
        verdict = "no consistent difference (range spans 1)"
    return PairResult(a.label, b.label, a_tag, b_tag, len(ratios), s["min"], s["median"], s["max"], verdict)


@dataclass
class CompareReport:
    """A comparison's configurations with their round-by-round timings, and every pair's speedups."""

    environment: dict
    settings: dict
    entries: list[CompareEntry]
    pairs: list[PairResult]

    @property
    def tags(self) -> list[str]:
        return [_tag(i) for i in range(len(self.entries))]

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "environment": self.environment,
            "settings": self.settings,
            "configs": [dict(tag=t, **e.to_dict()) for t, e in zip(self.tags, self.entries)],
            "pairs": [p.to_dict() for p in self.pairs],
        }

    def write_json(self, path: str | os.PathLike) -> Path:
        return write_json(path, self.to_dict())

    def write_csv(self, path: str | os.PathLike) -> Path:
        """One row per pair (the configurations' own timings are in the JSON)."""
        columns = [f.name for f in dataclasses.fields(PairResult)]
        return write_csv(path, [p.to_dict() for p in self.pairs], columns)


def _tag(i: int) -> str:
    return chr(ord("A") + i) if i < 26 else f"C{i}"


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------


@dataclass
class ComparePlan:
    """The parsed configurations of a comparison (label, config) and how they will be timed."""

    configs: list[tuple[str, BenchConfig]]
    rounds: int
    warmup: TimingPolicy
    round_timing: TimingPolicy
    settings: dict

    def describe(self) -> str:
        w, r = self.warmup, self.round_timing
        return (
            f"comparing {len(self.configs)} configurations on {self.settings['device']}: warm-up >= "
            f"{w.warmup_iters} calls and >= {w.warmup_s:g} s each, then {self.rounds} rounds; in a round each "
            f"configuration gets {r.warmup_iters} re-warm call(s), then >= {r.min_iters} timed calls and "
            f">= {r.min_s:g} s"
        )


def plan_compare(
    configs: Sequence[str | BenchConfig],
    *,
    task: str = "classification",
    rounds: int = 10,
    device: str | None = "auto",
    batch_size: int = 1,
    image_size: int | tuple[int, int] | None = None,
    precision: str = "fp32",
    backend: str = "eager",
    compile_mode: str | None = None,
    channels_last: bool = False,
    reparam: bool = False,
    threads: int | None = None,
    cudnn_benchmark: bool = True,
    warmup: TimingPolicy | None = None,
    round_timing: TimingPolicy | None = None,
) -> ComparePlan:
    """Parse and check a comparison without running it.

    Args:
        configs: two or more specs "MODEL[@key=value,...]" (see `parse_spec`; the keyword
            arguments are the base every spec starts from) or ready `BenchConfig`s.
        task: "classification" or "detection" (backbone + RetinaNet FPN neck, see `plan`).
        rounds: rounds of the interleaved schedule (>= 2; 10 by default).
        batch_size: one batch size for all (1: latency). image_size: S or (H, W) (default: the task's).
        warmup: the warm-up each configuration gets once before round 1 (its `warmup_*` fields).
        round_timing: one round of one configuration: re-warm calls, then timed calls.
    """
    if len(configs) < 2:
        raise ValueError("a comparison needs at least two configurations")
    if rounds < MIN_ROUNDS:
        raise ValueError(f"a comparison needs at least {MIN_ROUNDS} rounds, got {rounds}")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    check_task(task)
    device = resolve_device(device)
    image_size = image_size or default_image_size(task)
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    base = BenchConfig(
        model="",
        mode=mode_of(batch_size),
        task=task,
        device=device,
        batch_size=batch_size,
        image_size=(h, w),
        precision=precision,
        backend=backend,
        compile_mode=compile_mode,
        channels_last=channels_last,
        reparam=reparam,
        threads=threads,
        cudnn_benchmark=cudnn_benchmark,
    )
    parsed = [(c, parse_spec(c, base)) if isinstance(c, str) else (c.describe(), c) for c in configs]
    labels = [label for label, _ in parsed]
    if len(set(labels)) != len(labels):
        raise ValueError(f"configurations must differ: {labels}")
    devices = {c.device for _, c in parsed}
    if len(devices) > 1:
        raise ValueError(f"all configurations must use one device, got {sorted(devices)}")
    for _, config in parsed:
        check_image_size(config.model, config.image_size)
    warmup = warmup or default_timing(device)
    round_timing = round_timing or default_round_timing(device)
    settings = {
        "configs": labels,
        "task": task,
        "rounds": rounds,
        "device": device,
        "batch_size": batch_size,
        "image_size": [h, w],
        "warmup": warmup.to_dict(),
        "round_timing": round_timing.to_dict(),
    }
    return ComparePlan(parsed, rounds, warmup, round_timing, settings)


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def run_compare(plan: ComparePlan, progress: bool = False) -> CompareReport:
    """Prepare every configuration, time them in interleaved rounds, and pair them up."""
    entries = [CompareEntry(label, config, model_source(config.model)) for label, config in plan.configs]
    env = environment(plan.settings["device"])
    ready = _prepare(entries)
    _time_in_rounds(ready, plan, progress)
    return CompareReport(environment=env, settings=plan.settings, entries=entries, pairs=_pairs(entries))


def compare(configs: Sequence[str | BenchConfig], *, progress: bool = False, **options) -> CompareReport:
    """Time configurations interleaved, round by round, in this process; report per-pair speedups.

    `options` are the keyword arguments of `plan_compare` (task, rounds, device, batch_size,
    image_size, precision, backend, compile_mode, channels_last, reparam, threads, cudnn_benchmark,
    warmup, round_timing); `progress` shows a progress bar (stderr).
    """
    return run_compare(plan_compare(configs, **options), progress=progress)


def _prepare(entries: list[CompareEntry]) -> list[tuple[CompareEntry, Candidate]]:
    """Build (each model once), reparameterise, count and prepare every runnable configuration; a
    skipped or failing one is recorded on its entry and left out."""
    pristine: dict[str, object] = {}
    macs_cache: dict = {}
    ready = []
    for e in entries:
        c = e.config
        reason = unsupported_reason(c.backend, c.precision, c.device, c.channels_last)
        if reason is not None:
            e.status, e.error = "skipped", reason
            continue
        try:
            if c.model not in pristine:
                pristine[c.model] = build_source(c.model, c.task)
            model, e.reparam_applied = inference_form(copy.deepcopy(pristine[c.model]), c, c.model)
            e.params, e.macs = params_and_macs(model, c, macs_cache)
            with config_context(c):
                prepared, e.prepare_s = prepare_config(c, model)
            e.timer, e.backend_note, e.tuning = prepared.timer.name, prepared.note, prepared.tuning
            ready.append((e, prepared.candidate(e.label, functools.partial(config_context, c))))
        except Exception as exc:
            e.status, e.error = classify_failure(exc)
    return ready


def _time_in_rounds(ready: list[tuple[CompareEntry, Candidate]], plan: ComparePlan, progress: bool) -> None:
    """The interleaved rounds; each entry gets its round medians and samples (or its failure)."""
    rounds = Rounds(plan.rounds, burst=plan.round_timing, warmup=plan.warmup)
    bar = tqdm(total=plan.rounds * len(ready), desc="compare", unit="run", disable=not progress, dynamic_ncols=True)
    with bar:
        times = interleave([c for _, c in ready], rounds, keep_going=True, on_burst=lambda i, r: bar.update(1))
    for (e, _), t in zip(ready, times):
        e.round_medians_ms = [m * 1e3 for m in t.round_medians_s]
        e.samples_s = t.samples_s
        if t.error is not None:  # dropped from later rounds; pairs use the rounds it finished
            e.status, e.error = classify_failure(t.error)


def _pairs(entries: list[CompareEntry]) -> list[PairResult]:
    tags = [_tag(i) for i in range(len(entries))]
    return [
        pair_result(entries[i], entries[j], tags[i], tags[j])
        for i in range(len(entries))
        for j in range(i + 1, len(entries))
        if entries[i].round_medians_ms and entries[j].round_medians_ms
    ]

"""MACs, parameters and the analytic latency model against measured latency and throughput across a
set of models (ours and timm's).

Every model is timed in throughput mode (large batch) and latency mode (batch 1) with the same
settings. Within a mode, the models are timed *interleaved* (`lowformer.measure.timing.interleave`):
after a warm-up each, every round gives each model a short burst, in alternating order, so that the
drifts of a busy machine hit every model alike and the ranking is fair; a model's time is the median
of all its calls. The analysis adds a time budget, the rank of every model by MACs and by each
measured time, and, per mode, the rank correlations (Spearman's rho, Kendall's tau-b) with measured
time of MACs, of parameters and of the latency model's prediction (`lowformer.analyze.predict`),
and the prediction's median absolute percentage error. A correlation of 1 means the quantity orders
the models exactly as the clock does.

With a latency model, its compute ceiling is measured again while the models run: the calibration's
matmul (`lowformer.measure.calibrate.compute_probe`) joins the rounds, between every few models, and
says how much slower (or faster) the device ran each mode than at the calibration (`probes`). The
prediction stays the calibration's; the same prediction at the probed speed (every term of the model
divides by a ceiling or multiplies the overhead, so a uniformly slower device scales it alike) is
recorded beside it, `predicted_ms_at_probe_speed`, with its error: on the development CPU it did not
predict better (docs/analyze.md).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._io import write_json
from ..bench.models import DEFAULT_MODELS, build_source
from ..bench.planner import ModelArg, Plan, plan
from ..bench.presets import QUICK_TIMING, default_timing
from ..bench.result import BenchConfig, BenchReport, BenchResult
from ..bench.runner import config_context, inference_form, new_result, params_and_macs, prepare_config
from ..measure import stats
from ..measure.calibrate import compute_probe
from ..measure.env import environment, keep_freed_memory, memory_mode
from ..measure.session import classify_failure, frozen_heap
from ..measure.timing import Candidate, Rounds, TimingPolicy, check_clock, device_timer, interleave

_logger = logging.getLogger(__name__)

SCHEMA = "lowformer.analyze.models/1"

# Named model sets (`lowformer analyze models --set NAME`).
MODEL_SETS: dict[str, tuple[str, ...]] = {
    # the benchmark's comparison: our families against the peers the papers compare with
    "bench": DEFAULT_MODELS,
    # ours and timm's efficient families at 224 px, 0.06-2.6 GMACs: convolutional (MobileNet v3/v4,
    # EfficientNet, GhostNet, LCNet, MobileOne, RepViT, FastViT) and hybrid or attention models
    # (EfficientViT MIT and MSRA, EfficientFormerV2, EdgeNeXt, MobileViTv2, LeViT, SHViT)
    "efficient24": (
        "lowformer_b0",
        "lowformer_b1",
        "lowformer_b15",
        "lowformer_e1",
        "edgevit_xxs",
        "edgevit_xs",
        "timm:mobilenetv3_large_100",
        "timm:mobilenetv3_small_100",
        "timm:mobilenetv4_conv_small",
        "timm:mobilenetv4_conv_medium",
        "timm:efficientnet_b0",
        "timm:ghostnet_100",
        "timm:lcnet_100",
        "timm:efficientvit_b0",
        "timm:efficientvit_b1",
        "timm:efficientvit_m2",
        "timm:fastvit_t8",
        "timm:repvit_m1_1",
        "timm:mobileone_s1",
        "timm:efficientformerv2_s1",
        "timm:edgenext_x_small",
        "timm:mobilevitv2_050",
        "timm:levit_128s",
        "timm:shvit_s1",
    ),
    # models of about the same MACs, where MACs cannot rank them: ours and one model per timm
    # efficient family (RegNet X and Y both) with 0.75-1.45 GMACs at 224 px (a 1.9x range), the
    # band chosen before timing anything; MobileViTv2 is the 0.75x width
    "isomacs24": (
        "lowformer_b0",
        "lowformer_b1",
        "lowformer_e1",
        "edgevit_xs",
        "timm:mobilenetv3_large_150d",
        "timm:mobilenetv4_conv_medium",
        "timm:mobilenetv4_hybrid_medium",
        "timm:efficientformer_l1",
        "timm:efficientformerv2_s2",
        "timm:fastvit_t12",
        "timm:mobileone_s1",
        "timm:repvit_m1_1",
        "timm:edgenext_small",
        "timm:regnetx_008",
        "timm:regnety_008",
        "timm:convnext_femto",
        "timm:levit_256",
        "timm:tf_efficientnetv2_b1",
        "timm:hgnetv2_b2",
        "timm:resnet10t",
        "timm:rexnet_150",
        "timm:shvit_s4",
        "timm:starnet_s3",
        "timm:mobilevitv2_075",
    ),
    # the same rule one band up, 1.45-2.6 GMACs (a 1.8x range): ours in that band and one model per
    # timm family, none of them in the sets above; fixed before any of them was timed, to judge the
    # latency model on models that no choice about it was made by looking at
    "isomacs24-large": (
        "lowformer_b15",
        "edgevit_s",
        "timm:resnet18",
        "timm:regnetx_016",
        "timm:regnety_016",
        "timm:efficientvit_b2",
        "timm:fastvit_sa12",
        "timm:repvit_m1_5",
        "timm:efficientformerv2_l",
        "timm:levit_384",
        "timm:mobilevitv2_125",
        "timm:mobilevit_s",
        "timm:hgnetv2_b3",
        "timm:tf_efficientnetv2_b3",
        "timm:mobileone_s3",
        "timm:rexnet_200",
        "timm:convnext_nano",
        "timm:mobilenetv4_conv_large",
        "timm:mobilenetv4_hybrid_large",
        "timm:fasternet_t2",
        "timm:coatnet_nano_rw_224",
        "timm:pvt_v2_b1",
        "timm:poolformerv2_s12",
        "timm:gcvit_xxtiny",
    ),
}
DEFAULT_ROUNDS = 5
QUICK_ROUNDS = 2

_monotonic = time.monotonic


def model_set(name: str) -> tuple[str, ...]:
    try:
        return MODEL_SETS[name]
    except KeyError:
        raise ValueError(f"unknown model set {name!r}; choose from {', '.join(MODEL_SETS)}") from None


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass
class ModelsReport:
    """The benchmark records of the model set, the latency model's predictions, and the budget state."""

    bench: BenchReport
    stopped: str | None = None  # "budget" when configurations were left unmeasured
    not_run: list[str] = field(default_factory=list)  # those configurations, described
    predictions: list[dict] = field(default_factory=list)  # lowformer.analyze.predict.predict_model records
    latency_model: dict | None = None  # ceilings and factors the predictions used
    probes: list[dict] = field(default_factory=list)  # per mode: the compute ceiling re-measured (`probe_record`)

    def predicted_ms(self, model: str, batch_size: int, key: str = "predicted_ms") -> float | None:
        for p in self.predictions:
            if p["model"] == model and p["batch_size"] == batch_size:
                return p.get(key)
        return None

    def ranks(self) -> list[dict]:
        """Per model: MACs, latency, throughput, predictions, and the rank of each (1 = fewest MACs / fastest)."""
        rows: dict[str, dict] = {}
        for r in self.bench.results:
            row = rows.setdefault(r.model, {"model": r.model, "source": r.source, "macs": r.macs, "params": r.params})
            if r.ok and r.mode == "latency":
                row["latency_ms"] = r.latency_ms_p50
                row["predicted_latency_ms"] = self.predicted_ms(r.model, r.batch_size)
            if r.ok and r.mode == "throughput":
                row["throughput_img_s"] = r.throughput_img_s
                row["throughput_batch"] = r.batch_size
                row["throughput_ms"] = r.latency_ms_p50
                row["predicted_throughput_ms"] = self.predicted_ms(r.model, r.batch_size)
        out = list(rows.values())
        for key, rank_key, sign in (
            ("macs", "rank_macs", 1),
            ("latency_ms", "rank_latency", 1),
            ("throughput_img_s", "rank_throughput", -1),
            ("predicted_latency_ms", "rank_predicted_latency", 1),
        ):
            have = [row for row in out if row.get(key) is not None]
            ranks = stats.rankdata([sign * row[key] for row in have])
            for row, rank in zip(have, ranks):
                row[rank_key] = rank
        return sorted(out, key=lambda row: (row.get("macs") is None, row.get("macs") or 0))

    def judgement(self) -> list[dict]:
        """Per mode and batch size: how well MACs, parameters and the prediction order the models by
        measured time (Spearman, Kendall), and the prediction's errors."""
        groups: dict[tuple[str, int], list[BenchResult]] = {}
        for r in self.bench.results:
            if r.ok and r.latency_ms_p50:
                groups.setdefault((r.mode, r.batch_size), []).append(r)
        out = []
        for (mode, batch), rs in groups.items():
            if len(rs) < 3:
                continue
            measured = [r.latency_ms_p50 for r in rs]
            entry = {"mode": mode, "batch_size": batch, "models": [r.model for r in rs]}
            for name, values in (("macs", [r.macs for r in rs]), ("params", [r.params for r in rs])):
                if all(v is not None for v in values):
                    entry[f"spearman_{name}"] = stats.spearman([float(v) for v in values], measured)
                    entry[f"kendall_{name}"] = stats.kendall([float(v) for v in values], measured)
            predicted = [self.predicted_ms(r.model, batch) for r in rs]
            if self.predictions and all(p is not None for p in predicted):
                errors = [abs(p / m - 1) for p, m in zip(predicted, measured)]
                entry["spearman_predicted"] = stats.spearman(predicted, measured)
                entry["kendall_predicted"] = stats.kendall(predicted, measured)
                entry["median_abs_error"] = stats.median(errors)
                entry["max_abs_error"] = max(errors)
                entry["errors"] = {r.model: p / m - 1 for r, p, m in zip(rs, predicted, measured)}
                probed = [self.predicted_ms(r.model, batch, "predicted_ms_at_probe_speed") for r in rs]
                if all(p is not None for p in probed):
                    at_probe = [abs(p / m - 1) for p, m in zip(probed, measured)]
                    entry["median_abs_error_at_probe_speed"] = stats.median(at_probe)
            out.append(entry)
        return sorted(out, key=lambda e: (e["mode"] != "throughput", e["batch_size"]))

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "stopped": self.stopped,
            "not_run": self.not_run,
            "ranks": self.ranks(),
            "judgement": self.judgement(),
            "predictions": self.predictions,
            "latency_model": self.latency_model,
            "probes": self.probes,
            "bench": self.bench.to_dict(),
        }

    def write_json(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    def write_csv(self, path: str | Path) -> Path:
        return self.bench.write_csv(path)


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------


@dataclass
class ModelsPlan:
    """The benchmark plan of a model set and how its modes are timed: interleaved rounds on a clock."""

    bench: Plan
    rounds: Rounds
    clock: str
    keep_memory: bool

    @property
    def settings(self) -> dict:
        return self.bench.settings

    @property
    def configs(self) -> list[BenchConfig]:
        return self.bench.configs

    def describe(self) -> str:
        w, b = self.rounds.warmup, self.rounds.burst
        clock = "the thread's CPU time" if self.clock == "cpu" else "the wall clock"
        memory = "; freed memory kept in the process" if self.keep_memory else ""
        lines = self.bench.describe().splitlines()
        lines[-1] = (
            f"  per mode, the models interleaved: warm-up >= {w.warmup_iters} calls and >= {w.warmup_s:g} s each, "
            f"then {self.rounds.count} rounds of >= {b.min_iters} calls and >= {b.min_s:g} s each "
            f"(1 call for a slower model); {clock}{memory}"
        )
        return "\n".join(lines)


def rounds_for(timing: TimingPolicy, count: int) -> Rounds:
    """The interleaved equivalent of a per-configuration timing policy: its warm-up once, its timed
    calls and seconds spread over `count` rounds (a model slower than a round's share gets one call
    per round)."""
    warmup = TimingPolicy(timing.warmup_iters, timing.warmup_s, min_iters=1, min_s=0.0)
    burst = TimingPolicy(0, 0.0, min_iters=max(1, math.ceil(timing.min_iters / count)), min_s=timing.min_s / count)
    return Rounds(count, burst=burst, warmup=warmup, one_call_when_slow=True)


def plan_models(
    models: Sequence[ModelArg] | None = None,
    *,
    device: str | None = "auto",
    batch_size: int | None = None,
    image_size: int | tuple[int, int] = 224,
    precision: str = "fp32",
    backend: str = "eager",
    channels_last: bool = False,
    reparam: bool = False,
    threads: int | None = None,
    timing: TimingPolicy | None = None,
    rounds: int | None = None,
    quick: bool = False,
    clock: str = "wall",
    keep_memory: bool = False,
) -> ModelsPlan:
    """The plan of a model set: every model in throughput and latency mode, same settings.

    Args:
        models: our names, "timm:NAME", modules or (label, module) pairs; at least 3 for a correlation.
            Default: the benchmark's set (`MODEL_SETS["bench"]`).
        batch_size: throughput batch (default 256 on CUDA, 16 on CPU); latency is batch 1.
        reparam: reparameterise first (our deploy mode; timm's reparameterize_model for MobileOne,
            FastViT, RepViT): MACs are then counted on the inference-form graph too.
        timing: per configuration, spread over the rounds (default: the benchmark's, >= 3 s per
            configuration on CPU; `quick`: `QUICK_TIMING`).
        rounds: interleaved rounds per mode (default 5; `quick`: 2).
        clock: "wall" or "cpu" (the thread's CPU time; one thread on a CPU, see
            `lowformer.measure.timing.ThreadCpuTimer`).
        keep_memory: keep freed memory in the process while timing (`lowformer.measure.env.keep_freed_memory`).
    """
    bench_plan = plan(
        list(models) if models is not None else list(DEFAULT_MODELS),
        modes=("throughput", "latency"),
        device=device,
        batch_sizes=[batch_size] if batch_size is not None else None,
        image_sizes=[image_size],
        precisions=[precision],
        backends=[backend],
        channels_last=channels_last,
        reparam=reparam,
        threads=[threads] if threads is not None else None,
        timing=timing or (QUICK_TIMING if quick else None),
    )
    device = bench_plan.settings["device"]
    check_clock(clock, device, threads)
    if rounds is not None and rounds < 1:
        raise ValueError(f"at least one round is needed, got {rounds}")
    count = rounds or (QUICK_ROUNDS if quick else DEFAULT_ROUNDS)
    per_config = timing or (QUICK_TIMING if quick else default_timing(device))
    bench_plan.settings.update(
        {"rounds": count, "clock": clock, "memory": "keep" if keep_memory else "default", "interleaved": True}
    )
    return ModelsPlan(bench_plan, rounds_for(per_config, count), clock, keep_memory)


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def _groups(configs: Sequence[BenchConfig]) -> list[list[BenchConfig]]:
    """The configurations timed against each other: same everything but the model, throughput first."""
    groups: dict[tuple, list[BenchConfig]] = {}
    for c in sorted(configs, key=lambda c: c.mode != "throughput"):
        groups.setdefault(dataclasses.replace(c, model=""), []).append(c)
    return list(groups.values())


def _fill(result: BenchResult, samples: list[float], warmup, timer: str) -> None:
    result.iterations = len(samples)
    result.timer = timer
    for key, value in stats.summarize_ms(samples).items():
        setattr(result, key, value)
    result.throughput_img_s = result.batch_size / stats.median(samples)
    if warmup is not None:
        result.warmup_iters, result.warmup_s = warmup.warmup_iters, warmup.warmup_s
    if result.macs:
        result.achieved_tflops = 2 * result.macs * result.throughput_img_s / 1e12


PROBES_PER_ROUND = 4  # the compute probe's visits per round, spread between the models


def _with_probes(timed: list[Candidate], probe: Candidate, count: int) -> tuple[list[Candidate], list[int]]:
    """`timed` with `probe` placed before every len/count of them (at least once); and where it is."""
    every = max(1, math.ceil(len(timed) / count))
    mixed, at = [], []
    for i, candidate in enumerate(timed):
        if i % every == 0:
            at.append(len(mixed))
            mixed.append(probe)
        mixed.append(candidate)
    return mixed, at


def probe_record(config: BenchConfig, samples_s: list[float], flops: float, calibrated_flops_per_s: float) -> dict:
    """The compute ceiling measured during one mode's rounds against the calibration's: `time_scale`
    is how many times longer than at the calibration the device took for the same work."""
    now = flops / stats.median(samples_s)
    return {
        "mode": config.mode,
        "batch_size": config.batch_size,
        "flops_per_s": now,
        "calibrated_flops_per_s": calibrated_flops_per_s,
        "time_scale": calibrated_flops_per_s / now,
        "calls": len(samples_s),
    }


def _time_group(
    group: list[BenchConfig], plan: ModelsPlan, pristine: dict, macs_cache: dict, probe=None
) -> tuple[list[BenchResult], list[float]]:
    """Prepare every model of one mode and time them in interleaved rounds; with `probe` (a step),
    it is timed between every few models too. Returns the results and the probe's call times."""
    results, candidates = [], []
    for config in group:
        source = plan.bench.sources[config.model]
        result = new_result(config, source)
        results.append(result)
        try:
            if config.model not in pristine:
                pristine[config.model] = build_source(source, config.task)
            model, result.reparam_applied = inference_form(copy.deepcopy(pristine[config.model]), config, source)
            result.params, result.macs = params_and_macs(model, config, macs_cache)
            with config_context(config):
                prepared, result.prepare_s = prepare_config(config, model)
            timer = device_timer(config.device, plan.clock) if plan.clock == "cpu" else prepared.timer
            context = functools.partial(config_context, config)
            candidates.append((result, Candidate(config.model, prepared.step, timer, context)))
        except Exception as e:  # recorded; the others are timed
            result.status, result.error = classify_failure(e)
    timed, at = [c for _, c in candidates], []
    if probe is not None and timed:
        context = functools.partial(config_context, group[0])
        probing = Candidate("compute probe", probe, device_timer(group[0].device, plan.clock), context)
        timed, at = _with_probes(timed, probing, PROBES_PER_ROUND)
    times = interleave(timed, plan.rounds, keep_going=True)
    probe_s = [s for i in at if times[i].ok for s in times[i].samples_s]
    times = [t for i, t in enumerate(times) if i not in at]
    for (result, candidate), t in zip(candidates, times):
        if t.error is not None:
            result.status, result.error = classify_failure(t.error)
        elif t.samples_s:
            _fill(result, t.samples_s, t.warmup, candidate.timer.name)
        result.threads = result.threads or torch.get_num_threads()
    return results, probe_s


def run_models(
    plan: ModelsPlan, budget_s: float | None = None, progress: bool = False, latency_model=None
) -> ModelsReport:
    """Run a model-set plan mode by mode; with `budget_s`, start no mode after that many seconds (its
    configurations are listed in `not_run`). With a `latency_model` (`lowformer.analyze.latency`),
    every model is also predicted at every batch size timed."""
    if budget_s is not None and budget_s < 0:
        raise ValueError(f"the time budget must be >= 0 seconds, got {budget_s}")
    start = _monotonic()
    device = plan.settings["device"]
    report = BenchReport(environment=environment(device), settings=plan.settings)
    not_run: list[str] = []
    pristine: dict = {}
    macs_cache: dict = {}
    probe, flops, probes = None, 0.0, []
    ceilings = latency_model.ceilings if latency_model is not None else None
    if ceilings is not None and (ceilings.device, ceilings.precision) == (device, plan.configs[0].precision):
        probe, flops = compute_probe(ceilings)
    with keep_freed_memory(plan.keep_memory), frozen_heap():
        report.environment["memory"] = memory_mode()
        for group in _groups(plan.configs):
            if budget_s is not None and _monotonic() - start >= budget_s:
                not_run += [c.describe() for c in group]
                continue
            if progress:
                _logger.info("timing %s (%d models)", group[0].mode, len(group))
            results, probe_s = _time_group(group, plan, pristine, macs_cache, probe)
            report.results += results
            if probe_s:
                probes.append(probe_record(group[0], probe_s, flops, ceilings.flops_per_s))
    out = ModelsReport(report, stopped="budget" if not_run else None, not_run=not_run, probes=probes)
    if latency_model is not None:
        out.predictions, out.latency_model = predictions_for(plan, report, latency_model, probes)
    return out


def at_probe_speed(prediction: dict, time_scale: float) -> dict:
    """A prediction record (`lowformer.analyze.predict.predict_model`) with its total for a device
    `time_scale` times slower than its calibration beside it: every term divides by a ceiling or
    multiplies the overhead, so the total scales alike."""
    at_speed = prediction["predicted_ms"] * time_scale
    return {**prediction, "time_scale": time_scale, "predicted_ms_at_probe_speed": at_speed}


def predictions_for(
    plan: ModelsPlan, report: BenchReport, latency_model, probes: Sequence[dict] = ()
) -> tuple[list[dict], dict]:
    """The latency model's prediction of every measured model at every batch size that was timed;
    where a probe measured the device during that batch size's rounds, also at the speed it found."""
    from .predict import model_summary, predict_model

    scales = {p["batch_size"]: p["time_scale"] for p in probes}
    out = []
    done = set()
    for r in report.results:
        if not r.ok or (r.model, r.batch_size) in done:
            continue
        done.add((r.model, r.batch_size))
        source = plan.bench.sources[r.model]
        try:
            prediction = predict_model(source, latency_model, r.batch_size, (r.image_height, r.image_width))
            if r.batch_size in scales:
                prediction = at_probe_speed(prediction, scales[r.batch_size])
            out.append({**prediction, "model": r.model})
        except Exception as e:  # a model the walk cannot count is left unpredicted
            _logger.warning("could not predict %s at batch %d: %s", r.model, r.batch_size, e)
    return out, model_summary(latency_model)


def analyze_models(
    models: Sequence[ModelArg] | None = None,
    *,
    budget_s: float | None = None,
    progress: bool = False,
    latency_model=None,
    **options,
) -> ModelsReport:
    """Time `models` (default: the benchmark's set) in throughput and latency mode; rank MACs,
    parameters and (with a `latency_model`) the prediction against time.

    `options` are the keyword arguments of `plan_models` (device, batch_size, image_size, precision,
    backend, channels_last, reparam, threads, timing, rounds, quick, clock, keep_memory); see
    `run_models` for `budget_s` and `latency_model`.
    """
    return run_models(plan_models(models, **options), budget_s=budget_s, progress=progress, latency_model=latency_model)

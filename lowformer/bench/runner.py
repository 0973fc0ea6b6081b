"""Running a benchmark plan: build each model once, time every configuration (in this process, or
in `jobs` concurrent processes), record failures and go on."""

from __future__ import annotations

import copy
import gc
import logging
import multiprocessing
import queue
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn
from tqdm import tqdm

from ..measure.env import PeakMemory, device_name, environment, peak_tflops, tf32_state
from ..measure.macs import count_macs
from ..measure.session import classify_failure, frozen_heap, input_shape, make_input, place, run_context
from ..measure.stats import median, summarize_ms
from ..measure.timing import measure
from .backends import TUNED, Prepared, prepare, reparam_layout, reparameterize, unsupported_reason
from .models import Source, build_source, source_kind
from .planner import ModelArg, Plan, plan
from .result import BenchConfig, BenchReport, BenchResult

_logger = logging.getLogger(__name__)

_JOB_BARRIER_TIMEOUT_S = 900.0


# --------------------------------------------------------------------------------------------
# One configuration
# --------------------------------------------------------------------------------------------


def config_context(config: BenchConfig):
    """The run context of `config` (threads, TF32, cudnn.benchmark, no_grad), restored after."""
    return run_context(config.device, config.precision, config.threads, config.cudnn_benchmark)


def inference_form(model: nn.Module, config: BenchConfig, source: Source) -> tuple[nn.Module, str | None]:
    """`model` reparameterised when `config` asks for it (see `backends.reparameterize`). The tuned
    backend deploys each candidate itself."""
    if not config.reparam or config.backend == TUNED:
        return model, None
    layout = reparam_layout(config.backend, config.device, config.channels_last)
    return reparameterize(model, layout, source_kind(source))


def prepare_config(config: BenchConfig, model: nn.Module) -> tuple[Prepared, float]:
    """Model and input on the device and in the layout, and the step of the backend; returns the
    step and how long preparing took (trace, export, compile, capture). Call in `config_context`."""
    x = make_input(input_shape(model, config.batch_size, config.image_size), config.device, config.channels_last)
    model = place(model, config.device, config.channels_last)
    start = time.perf_counter()
    prepared = prepare(model, x, config.backend, config.precision, config.device, config.compile_mode, config.threads)
    if config.device.startswith("cuda"):
        torch.cuda.synchronize(config.device)
    return prepared, time.perf_counter() - start


def _measure_config(config: BenchConfig, model: nn.Module, sync: Callable[[], None] | None = None) -> dict:
    """Prepare and time `model`; `sync` lines up concurrent jobs. The raw numbers of one process."""
    memory = PeakMemory(config.device)
    with config_context(config):
        memory.reset()
        prepared, prepare_s = prepare_config(config, model)
        if sync is not None:
            sync()  # all jobs start warming up together ...
        m = measure(prepared.step, prepared.timer, config.timing, before_timing=sync)  # ... and timing
        peak, source = memory.read()
        if config.backend == "onnxruntime" and config.device.startswith("cuda"):
            peak, source = None, "not_measured:onnxruntime_cuda_allocator"
        return {
            "samples_s": m.samples_s,
            "warmup_iters": m.warmup_iters,
            "warmup_s": m.warmup_s,
            "timed_s": m.timed_s,
            "timer": prepared.timer.name,
            "backend_note": prepared.note,
            "tuning": prepared.tuning,
            "prepare_s": prepare_s,
            "peak_memory_mib": peak,
            "memory_source": source,
            "threads": torch.get_num_threads(),
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            **tf32_state(),
        }


def params_and_macs(model: nn.Module, config: BenchConfig, cache: dict) -> tuple[int | None, int | None]:
    """Parameters and MACs per image of `model` (on CPU) at the config's image size, counted once."""
    key = (config.model, config.task, config.image_size, config.reparam)
    if key not in cache:
        try:
            report = count_macs(model, config.image_size, in_chans=getattr(model, "in_chans", 3), device="cpu")
            cache[key] = (report.params, report.macs)
        except Exception as e:  # a model the counter cannot run still gets timed
            _logger.warning("could not count MACs of %s at %s: %s", config.model, config.image_size, e)
            cache[key] = (sum(p.numel() for p in model.parameters()), None)
    return cache[key]


def run_config(
    config: BenchConfig, source: Source, pristine: nn.Module | None = None, macs_cache: dict | None = None
) -> BenchResult:
    """Time one configuration. Never raises for a failing model or backend: the result records it.

    Args:
        config: what to time.
        source: the model name, or the module itself.
        pristine: an already built CPU model for `source` (copied, never changed); built if None.
        macs_cache: shared across calls so each (model, image size, reparam) is counted once.
    """
    result = new_result(config, source)
    reason = unsupported_reason(config.backend, config.precision, config.device, config.channels_last)
    if reason is not None:
        result.status, result.error = "skipped", reason
        return result
    model = None
    try:
        model = copy.deepcopy(pristine) if pristine is not None else build_source(source, config.task)
        model, result.reparam_applied = inference_form(model, config, source)
        result.params, result.macs = params_and_macs(model, config, macs_cache if macs_cache is not None else {})
        if config.jobs > 1:
            raw = _run_jobs(config, source if isinstance(source, str) or pristine is None else pristine)
        else:
            raw = _measure_config(config, model)
        _fill(result, config, raw)
    except Exception as e:  # recorded as a failed configuration; the run goes on
        result.status, result.error = (e.status, str(e)) if isinstance(e, _JobFailure) else classify_failure(e)
        _logger.debug("%s failed", config.describe(), exc_info=True)
    finally:
        del model
        gc.collect()
        if config.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return result


def new_result(config: BenchConfig, source: Source) -> BenchResult:
    """The record of one configuration before it is timed (analyze's model sets start from it too)."""
    return BenchResult(
        model=config.model,
        source=source_kind(source),
        task=config.task,
        mode=config.mode,
        device=config.device,
        device_name=device_name(config.device),
        batch_size=config.batch_size,
        image_height=config.image_size[0],
        image_width=config.image_size[1],
        precision=config.precision,
        backend=config.backend,
        compile_mode=config.compile_mode,
        channels_last=config.channels_last,
        reparam=config.reparam,
        reparam_applied=None,
        threads=config.threads or torch.get_num_threads(),
        jobs=config.jobs,
    )


_RAW_FIELDS = (
    "timer",
    "backend_note",
    "tuning",
    "prepare_s",
    "warmup_iters",
    "warmup_s",
    "timed_s",
    "peak_memory_mib",
    "memory_source",
    "threads",
    "tf32_matmul",
    "tf32_cudnn",
    "cudnn_benchmark",
)


def _fill(result: BenchResult, config: BenchConfig, raw: dict) -> None:
    """The statistics of the raw samples (pooled over jobs), throughput and MFU, into `result`."""
    job_samples = raw.get("job_samples_s") or [raw["samples_s"]]
    pooled = [s for samples in job_samples for s in samples]
    for key in _RAW_FIELDS:
        setattr(result, key, raw[key])
    result.iterations = len(pooled)
    for key, value in summarize_ms(pooled).items():
        setattr(result, key, value)
    result.throughput_img_s = sum(config.batch_size / median(samples) for samples in job_samples)
    if len(job_samples) > 1:
        result.jobs_latency_ms_p50 = [median(samples) * 1e3 for samples in job_samples]
    if result.macs:
        result.achieved_tflops = 2 * result.macs * result.throughput_img_s / 1e12
        if config.peak_tflops is not None:
            result.peak_tflops, result.peak_tflops_source = config.peak_tflops, "user"
        elif config.device.startswith("cuda"):
            result.peak_tflops, result.peak_tflops_source = peak_tflops(result.device_name, config.precision)
        if result.peak_tflops:
            result.mfu = result.achieved_tflops / result.peak_tflops


# --------------------------------------------------------------------------------------------
# Concurrent jobs
# --------------------------------------------------------------------------------------------


class _JobFailure(RuntimeError):
    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


def _job_main(config: BenchConfig, source: Source, index: int, barrier, results) -> None:
    """One of `config.jobs` processes: build, prepare, then time in step with the others."""
    try:
        model, _ = inference_form(build_source(source, config.task), config, source)
        results.put((index, "ok", _measure_config(config, model, sync=barrier.wait)))
    except BaseException as e:  # report anything, so the parent never waits on a dead job
        barrier.abort()
        results.put((index, *classify_failure(e)))


def _run_jobs(config: BenchConfig, source: Source) -> dict:
    """Run `config.jobs` spawned processes on the same device; pool their samples."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(config.jobs, timeout=_JOB_BARRIER_TIMEOUT_S)
    results = ctx.Queue()
    # not daemonic: a job may start processes of its own (torch.compile's workers)
    procs = [ctx.Process(target=_job_main, args=(config, source, i, barrier, results)) for i in range(config.jobs)]
    for p in procs:
        p.start()
    got: dict[int, tuple[str, object]] = {}
    try:
        while len(got) < config.jobs:
            try:
                index, status, payload = results.get(timeout=1.0)
                got[index] = (status, payload)
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    break
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
                p.join()
    missing = [i for i in range(config.jobs) if i not in got]
    if missing:
        codes = ", ".join(f"job {i} exit code {procs[i].exitcode}" for i in missing)
        raise RuntimeError(f"job(s) ended without a result: {codes}")
    failed = [(i, s, p) for i, (s, p) in sorted(got.items()) if s != "ok"]
    if failed:
        # the first real failure, not the broken barrier it caused in the other jobs
        root = next((f for f in failed if "BrokenBarrierError" not in f[2]), failed[0])
        raise _JobFailure(root[1], f"job {root[0]}: {root[2]}")
    raws = [got[i][1] for i in range(config.jobs)]
    out = dict(raws[0])
    out["job_samples_s"] = [r["samples_s"] for r in raws]
    out["warmup_iters"] = min(r["warmup_iters"] for r in raws)
    for key in ("warmup_s", "timed_s", "prepare_s"):
        out[key] = max(r[key] for r in raws)
    peaks = [r["peak_memory_mib"] for r in raws if r["peak_memory_mib"] is not None]
    out["peak_memory_mib"] = max(peaks) if peaks else None
    return out


# --------------------------------------------------------------------------------------------
# A plan
# --------------------------------------------------------------------------------------------


def run_plan(plan: Plan, progress: bool = False, stop: Callable[[], bool] | None = None) -> BenchReport:
    """Time every configuration of `plan` in order, model by model (each model is built once).

    `stop()` is asked before each configuration; when it says True the run ends there, so the
    report holds a result for each of the first `len(report.results)` configurations.
    """
    device = plan.settings["device"]
    report = BenchReport(environment=environment(device), settings=plan.settings)
    macs_cache: dict = {}
    label, pristine, build_error = None, None, None
    bar = tqdm(plan.configs, desc="bench", unit="config", disable=not progress, dynamic_ncols=True)
    with frozen_heap(), bar:
        for config in bar:
            if stop is not None and stop():
                break
            bar.set_postfix_str(config.describe(), refresh=True)
            source = plan.sources[config.model]
            if config.model != label:
                label, pristine, build_error = config.model, None, None
                gc.collect()
                try:
                    pristine = build_source(source, config.task)
                except Exception as e:
                    build_error = e
            if build_error is not None:
                result = new_result(config, source)
                result.status, result.error = classify_failure(build_error)
            else:
                result = run_config(config, source, pristine, macs_cache)
            if not result.ok:
                _logger.info("%s: %s: %s", config.describe(), result.status, result.error)
            report.results.append(result)
    return report


def benchmark(models: Sequence[ModelArg] | None = None, *, progress: bool = False, **settings) -> BenchReport:
    """Measure throughput and latency of models over a sweep of settings: `run_plan(plan(...))`.

    Args:
        models: names from `lowformer.list_models()`, "timm:NAME", modules, or (label, module) pairs.
        progress: show a progress bar (stderr).
        **settings: the keyword arguments of `plan` (task, modes, device, batch_sizes, image_sizes,
            precisions, backends, compile_mode, channels_last, reparam, threads, jobs, preset,
            timing, peak_tflops, cudnn_benchmark), each list a sweep.

    Raises:
        ValueError: bad arguments, unknown model names (with close matches), or nothing runnable.
    """
    return run_plan(plan(models, **settings), progress=progress)

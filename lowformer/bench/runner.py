"""Plan and run benchmarks: expand the sweep into configurations, build each model once, time every
configuration (in this process, or in `jobs` concurrent processes), record failures and go on."""

from __future__ import annotations

import copy
import gc
import logging
import multiprocessing
import queue
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from ..factory import check_model_name, model_source
from ..measure import stats
from ..measure.env import (
    PeakMemory,
    cpu_name,
    device_name,
    environment,
    peak_tflops,
    resolve_device,
    tf32_state,
)
from ..measure.macs import count_macs
from ..measure.session import classify_failure, run_context
from ..measure.timing import TimingPolicy, measure
from .backends import Prepared, prepare, reparam_layout, reparameterize, unsupported_reason
from .models import build_model, check_task, default_models
from .presets import MODES, default_batch_size, default_image_size, default_timing, get_preset
from .result import BenchConfig, BenchReport, BenchResult

_logger = logging.getLogger(__name__)

ModelArg = str | nn.Module | tuple[str, nn.Module]
Source = str | nn.Module  # what builds a model: a name, or the module itself

_JOB_BARRIER_TIMEOUT_S = 900.0


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """The configurations a run will time, what builds each model, and the resolved settings."""

    configs: list[BenchConfig]
    sources: dict[str, Source]
    settings: dict

    def describe(self) -> str:
        s = self.settings
        device = s["device"]
        where = f"{device} ({device_name(device) if device.startswith('cuda') else cpu_name()})"
        threads = ", ".join(map(str, s["threads"])) if s["threads"] else str(torch.get_num_threads())
        where += f", threads {threads}" if not device.startswith("cuda") else ""
        modes = []
        if "throughput" in s["modes"]:
            modes.append("throughput: batch " + ", ".join(map(str, s["batch_sizes"])))
        if "latency" in s["modes"]:
            modes.append("latency: batch 1")
        images = ", ".join(f"{h}x{w}" for h, w in s["image_sizes"])
        layout = "channels_last" if s["channels_last"] else "NCHW"
        task = " (detection: backbone + RetinaNet FPN neck, P3-P7 at 256 channels)" * (s["task"] == "detection")
        lines = [
            f"{len(s['models'])} model(s), {len(self.configs)} configuration(s) on {where}{task}",
            f"  {' | '.join(modes)} | image {images} | backend {', '.join(s['backends'])} | "
            f"precision {', '.join(s['precisions'])} | {layout} | reparam {'on' if s['reparam'] else 'off'}"
            + (f" | {s['jobs']} jobs" if s["jobs"] > 1 else ""),
            f"  timing per configuration: {TimingPolicy(**s['timing']).describe()}",
        ]
        if s["preset"]:
            lines.append(f"  preset {s['preset']}")
        return "\n".join(lines)


def _image_size(size: int | Sequence[int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h < 8 or w < 8:
        raise ValueError(f"image size must be at least 8x8, got {h}x{w}")
    return int(h), int(w)


def _as_tuple(value, default: tuple) -> tuple:
    """A sweep list as a tuple without repeats (a single value becomes a 1-tuple)."""
    if value is None:
        return tuple(default)
    if isinstance(value, (str, int)):
        return (value,)
    return tuple(dict.fromkeys(value))


def _sources(models: Sequence[ModelArg]) -> dict[str, Source]:
    out: dict[str, Source] = {}
    for m in models:
        if isinstance(m, str):
            check_model_name(m)
            label, src = m, m
        elif isinstance(m, nn.Module):
            label, src = type(m).__name__, m
        elif isinstance(m, tuple) and len(m) == 2 and isinstance(m[0], str) and isinstance(m[1], nn.Module):
            label, src = m
        else:
            raise TypeError(f"a model is a name, an nn.Module or a (label, nn.Module) pair, got {m!r}")
        if label in out:
            raise ValueError(f"model {label!r} is given twice")
        out[label] = src
    if not out:
        raise ValueError("no models to benchmark")
    return out


def plan(
    models: Sequence[ModelArg] | None = None,
    *,
    task: str = "classification",
    modes: Sequence[str] | None = None,
    device: str | None = "auto",
    batch_sizes: Sequence[int] | int | None = None,
    image_sizes: Sequence[int | tuple[int, int]] | int | None = None,
    precisions: Sequence[str] | str | None = None,
    backends: Sequence[str] | str | None = None,
    compile_mode: str | None = None,
    channels_last: bool = False,
    reparam: bool = False,
    threads: Sequence[int] | int | None = None,
    jobs: int = 1,
    preset: str | None = None,
    timing: TimingPolicy | None = None,
    peak_tflops: float | None = None,
    cudnn_benchmark: bool = True,
) -> Plan:
    """Resolve arguments (explicit > preset > device default) into configurations; see `benchmark`."""
    check_task(task)
    device = resolve_device(device)
    p = get_preset(preset) if preset else None
    modes = _as_tuple(modes, p.modes if p else MODES)
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    if batch_sizes is not None and "throughput" not in modes and _as_tuple(batch_sizes, ()) != (1,):
        raise ValueError("batch sizes apply to throughput mode; latency mode is batch 1 by definition")
    throughput_batch = (p.batch_sizes if p and p.batch_sizes else None) or (default_batch_size(device, task),)
    batch_sizes = _as_tuple(batch_sizes, throughput_batch)
    # the presets are the papers' classification protocols: their 224x224 does not apply to detection
    default_images = p.image_sizes if p and task == "classification" else (default_image_size(task),)
    image_sizes = tuple(dict.fromkeys(_image_size(s) for s in _as_tuple(image_sizes, default_images)))
    precisions = _as_tuple(precisions, p.precisions if p else ("fp32",))
    backends = _as_tuple(backends, p.backends if p else ("eager",))
    timing = timing or (p.timing if p and p.timing else default_timing(device))
    threads = _as_tuple(threads, (None,))
    if any(b < 1 for b in batch_sizes):
        raise ValueError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    if any(t is not None and t < 1 for t in threads):
        raise ValueError(f"threads must be >= 1, got {list(threads)}")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    if compile_mode is not None and "compile" not in backends:
        raise ValueError("a compile mode needs the compile backend (--backend compile)")
    if peak_tflops is not None and peak_tflops <= 0:
        raise ValueError(f"peak TFLOP/s must be > 0, got {peak_tflops}")
    for backend in backends:
        for precision in precisions:
            unsupported_reason(backend, precision, device, channels_last)  # raises on unknown names
    sources = _sources(models if models is not None else default_models(task))
    configs = [
        BenchConfig(
            model=label,
            mode=mode,
            task=task,
            device=device,
            batch_size=bs,
            image_size=image,
            precision=precision,
            backend=backend,
            compile_mode=compile_mode,
            channels_last=channels_last,
            reparam=reparam,
            threads=t,
            jobs=jobs,
            cudnn_benchmark=cudnn_benchmark,
            timing=timing,
            peak_tflops=peak_tflops,
        )
        for label in sources
        for mode in modes
        for bs in (batch_sizes if mode == "throughput" else (1,))
        for image in image_sizes
        for backend in backends
        for precision in precisions
        for t in threads
    ]
    reasons = {unsupported_reason(c.backend, c.precision, device, channels_last) for c in configs}
    if None not in reasons:
        raise ValueError("nothing to run: " + "; ".join(sorted(reasons)))
    settings = {
        "models": list(sources),
        "task": task,
        "device": device,
        "modes": list(modes),
        "batch_sizes": list(batch_sizes),
        "image_sizes": [list(s) for s in image_sizes],
        "precisions": list(precisions),
        "backends": list(backends),
        "compile_mode": compile_mode,
        "channels_last": channels_last,
        "reparam": reparam,
        "threads": None if threads == (None,) else list(threads),
        "jobs": jobs,
        "preset": preset,
        "timing": timing.to_dict(),
        "cudnn_benchmark": cudnn_benchmark,
        "peak_tflops": peak_tflops,
    }
    return Plan(configs=configs, sources=sources, settings=settings)


# --------------------------------------------------------------------------------------------
# Running one configuration
# --------------------------------------------------------------------------------------------


def config_context(config: BenchConfig):
    """The run context of `config` (threads, TF32, cudnn.benchmark, no_grad), restored after."""
    return run_context(config.device, config.precision, config.threads, config.cudnn_benchmark)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def build_source(source: Source, task: str = "classification") -> nn.Module:
    """The model a name builds for `task`; a module given directly is timed as it is."""
    return build_model(source, task) if isinstance(source, str) else source.eval()


def prepare_config(config: BenchConfig, model: nn.Module) -> tuple[Prepared, float]:
    """Move `model` to the device and layout, make the input and the step. Call in `config_context`."""
    model = model.to(config.device)
    in_chans = getattr(model, "in_chans", 3)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(config.batch_size, in_chans, *config.image_size, generator=generator).to(config.device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    start = time.perf_counter()
    prepared = prepare(model, x, config.backend, config.precision, config.device, config.compile_mode, config.threads)
    _sync(config.device)
    return prepared, time.perf_counter() - start


def _measure_config(config: BenchConfig, model: nn.Module, sync=None) -> dict:
    """Prepare and time `model` (on CPU, reparameterised if asked); `sync` lines up concurrent jobs."""
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
            "prepare_s": prepare_s,
            "peak_memory_mib": peak,
            "memory_source": source,
            "threads": torch.get_num_threads(),
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            **tf32_state(),
        }


def _job_main(config: BenchConfig, source: Source, index: int, barrier, results) -> None:
    """One of `config.jobs` processes: build, prepare, then time in step with the others."""
    try:
        model = build_source(source, config.task)
        if config.reparam:
            model, _ = reparameterize(model, reparam_layout(config.backend, config.device, config.channels_last))
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


class _JobFailure(RuntimeError):
    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


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


def _new_result(config: BenchConfig, source: Source) -> BenchResult:
    return BenchResult(
        model=config.model,
        source=model_source(source) if isinstance(source, str) else "module",
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


def _fill(result: BenchResult, config: BenchConfig, raw: dict) -> None:
    job_samples = raw.get("job_samples_s") or [raw["samples_s"]]
    pooled = [s for samples in job_samples for s in samples]
    for key in (
        "timer",
        "backend_note",
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
    ):
        setattr(result, key, raw[key])
    result.iterations = len(pooled)
    for key, value in stats.summarize_ms(pooled).items():
        setattr(result, key, value)
    result.throughput_img_s = sum(config.batch_size / stats.median(samples) for samples in job_samples)
    if len(job_samples) > 1:
        result.jobs_latency_ms_p50 = [stats.median(samples) * 1e3 for samples in job_samples]
    if result.macs:
        result.achieved_tflops = 2 * result.macs * result.throughput_img_s / 1e12
        if config.peak_tflops is not None:
            result.peak_tflops, result.peak_tflops_source = config.peak_tflops, "user"
        elif config.device.startswith("cuda"):
            result.peak_tflops, result.peak_tflops_source = peak_tflops(result.device_name, config.precision)
        if result.peak_tflops:
            result.mfu = result.achieved_tflops / result.peak_tflops


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
    result = _new_result(config, source)
    reason = unsupported_reason(config.backend, config.precision, config.device, config.channels_last)
    if reason is not None:
        result.status, result.error = "skipped", reason
        return result
    model = None
    try:
        model = copy.deepcopy(pristine) if pristine is not None else build_source(source, config.task)
        if config.reparam:
            model, result.reparam_applied = reparameterize(
                model, reparam_layout(config.backend, config.device, config.channels_last)
            )
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


# --------------------------------------------------------------------------------------------
# Running a plan
# --------------------------------------------------------------------------------------------


def run_plan(plan: Plan, progress: bool = False) -> BenchReport:
    """Time every configuration of `plan`, model by model (each model is built once)."""
    device = plan.settings["device"]
    report = BenchReport(environment=environment(device), settings=plan.settings)
    macs_cache: dict = {}
    label, pristine, build_error = None, None, None
    bar = tqdm(plan.configs, desc="bench", unit="config", disable=not progress, dynamic_ncols=True)
    for config in bar:
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
            result = _new_result(config, source)
            result.status, result.error = classify_failure(build_error)
        else:
            result = run_config(config, source, pristine, macs_cache)
        if not result.ok:
            _logger.info("%s: %s: %s", config.describe(), result.status, result.error)
        report.results.append(result)
    return report


def benchmark(
    models: Sequence[ModelArg] | None = None,
    *,
    task: str = "classification",
    modes: Sequence[str] | None = None,
    device: str | None = "auto",
    batch_sizes: Sequence[int] | int | None = None,
    image_sizes: Sequence[int | tuple[int, int]] | int | None = None,
    precisions: Sequence[str] | str | None = None,
    backends: Sequence[str] | str | None = None,
    compile_mode: str | None = None,
    channels_last: bool = False,
    reparam: bool = False,
    threads: Sequence[int] | int | None = None,
    jobs: int = 1,
    preset: str | None = None,
    timing: TimingPolicy | None = None,
    peak_tflops: float | None = None,
    cudnn_benchmark: bool = True,
    progress: bool = False,
) -> BenchReport:
    """Measure throughput and latency of models over a sweep of settings.

    Every list argument is a sweep; each combination is one configuration (one result row).

    Args:
        models: names from `lowformer.list_models()`, "timm:NAME", modules, or (label, module)
            pairs. Default: `DEFAULT_MODELS` (`DETECTION_MODELS` for task "detection").
        task: "classification" (the classifier) or "detection" (backbone + RetinaNet FPN neck, the
            papers' dense-prediction speed setting; default image 512x512, CPU batch 4, GPU 32). A
            module given directly is timed as it is.
        modes: "throughput" (each of `batch_sizes`) and/or "latency" (batch 1). Default: both.
        device: "auto" (CUDA if available, else CPU), "cpu", "cuda" or "cuda:N".
        batch_sizes: throughput batch sizes. Default: 256 on CUDA, 16 on CPU (detection: 32, 4).
        image_sizes: sizes as S or (H, W). Default: 224 (detection: 512).
        precisions: "fp32" (TF32 off), "tf32", "fp16", "bf16" (autocast). Default: fp32.
        backends: "eager", "compile", "torchscript", "onnxruntime", "cudagraphs". Default: eager.
        compile_mode: `torch.compile` mode for the compile backend.
        channels_last: run model and input in channels_last memory format.
        reparam: reparameterise first (see `backends.reparameterize`).
        threads: intra-op CPU threads (also ONNX Runtime's). Default: torch's choice.
        jobs: concurrent processes per configuration (spawned; samples pooled, throughputs summed).
            A script that uses jobs > 1 needs the `if __name__ == "__main__":` guard.
        preset: "paper-throughput" or "paper-latency"; explicit arguments override it.
        timing: warm-up and timed-iteration bounds. Default: per device (see `presets.py`).
        peak_tflops: the device's peak for MFU, overriding the built-in GPU table.
        cudnn_benchmark: let cuDNN pick the fastest convolution algorithms (CUDA).
        progress: show a progress bar (stderr).

    Raises:
        ValueError: bad arguments, unknown model names (with close matches), or nothing runnable.
    """
    p = plan(
        models,
        task=task,
        modes=modes,
        device=device,
        batch_sizes=batch_sizes,
        image_sizes=image_sizes,
        precisions=precisions,
        backends=backends,
        compile_mode=compile_mode,
        channels_last=channels_last,
        reparam=reparam,
        threads=threads,
        jobs=jobs,
        preset=preset,
        timing=timing,
        peak_tflops=peak_tflops,
        cudnn_benchmark=cudnn_benchmark,
    )
    return run_plan(p, progress=progress)

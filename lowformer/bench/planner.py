"""Planning a benchmark: arguments (explicit > preset > device default) resolved into the
configurations a run will time, checked before anything is built or timed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..factory import check_image_size, check_model_name
from ..measure.env import cpu_name, device_name, resolve_device
from ..measure.session import LATENCY_BATCH, MODES, batch_sizes_by_mode, check_modes
from ..measure.timing import TimingPolicy
from .backends import TUNED, unsupported_reason
from .models import TASK_DESCRIPTIONS, Source, check_task, default_models
from .presets import default_batch_size, default_image_size, default_timing, get_preset
from .result import BenchConfig

ModelArg = str | nn.Module | tuple[str, nn.Module]


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
            modes.append(f"latency: batch {LATENCY_BATCH}")
        images = ", ".join(f"{h}x{w}" for h, w in s["image_sizes"])
        layout = "channels_last" if s["channels_last"] else "NCHW"
        task = f" ({s['task']}: {TASK_DESCRIPTIONS[s['task']]})" * (s["task"] != "classification")
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
    """Resolve arguments (explicit > preset > device default) into configurations, without running them.

    Every list argument is a sweep; each combination is one configuration (one result row).

    Args:
        models: names from `lowformer.list_models()`, "timm:NAME", modules, or (label, module)
            pairs. Default: `DEFAULT_MODELS` (`DETECTION_MODELS` for "detection" and "segmentation").
        task: "classification" (the classifier), "detection" (backbone + RetinaNet FPN neck, the
            papers' dense-prediction speed setting) or "segmentation" (the whole Semantic FPN); the
            dense tasks default to image 512x512, CPU batch 4, GPU 32. A module given directly is
            timed as it is.
        modes: "throughput" (each of `batch_sizes`) and/or "latency" (batch 1). Default: both.
        device: "auto" (CUDA if available, else CPU), "cpu", "cuda" or "cuda:N".
        batch_sizes: throughput batch sizes. Default: 256 on CUDA, 16 on CPU (dense tasks: 32, 4).
        image_sizes: sizes as S or (H, W), each checked against every model with
            `lowformer.factory.check_image_size`. Default: 224 (dense tasks: 512).
        precisions: "fp32" (TF32 off), "tf32", "fp16", "bf16" (autocast). Default: fp32.
        backends: "eager", "compile", "torchscript", "onnxruntime", "cudagraphs", "aoti", or
            "tuned" (each model in its fastest verified configuration, found by `lowformer.tune`).
            Default: eager.
        compile_mode: `torch.compile` mode for the compile backend (on CPU with inductor freezing).
        channels_last: run model and input in channels_last memory format.
        reparam: reparameterise first (see `backends.reparameterize`).
        threads: intra-op CPU threads (also ONNX Runtime's). Default: torch's choice.
        jobs: concurrent processes per configuration (spawned; samples pooled, throughputs summed).
            A script that uses jobs > 1 needs the `if __name__ == "__main__":` guard.
        preset: "paper-throughput" or "paper-latency"; explicit arguments override it.
        timing: warm-up and timed-iteration bounds. Default: `presets.default_timing(device, preset)`.
        peak_tflops: the device's peak for MFU, overriding the built-in GPU table.
        cudnn_benchmark: let cuDNN pick the fastest convolution algorithms (CUDA).

    Raises:
        ValueError: bad arguments, unknown model names (with close matches), an image size a model
            cannot take, or nothing runnable.
    """
    check_task(task)
    device = resolve_device(device)
    p = get_preset(preset) if preset else None
    modes = check_modes(_as_tuple(modes, p.modes if p else MODES))
    given_batches = None if batch_sizes is None else _as_tuple(batch_sizes, ())
    default_batches = (p.batch_sizes if p and p.batch_sizes else None) or (default_batch_size(device, task),)
    batches = batch_sizes_by_mode(modes, given_batches, default_batches)
    # the presets are the papers' classification protocols: their 224x224 does not apply to dense tasks
    default_images = p.image_sizes if p and task == "classification" else (default_image_size(task),)
    image_sizes = tuple(dict.fromkeys(_image_size(s) for s in _as_tuple(image_sizes, default_images)))
    precisions = _as_tuple(precisions, p.precisions if p else ("fp32",))
    backends = _as_tuple(backends, p.backends if p else ("eager",))
    timing = timing or default_timing(device, preset)
    threads = _as_tuple(threads, (None,))
    if any(t is not None and t < 1 for t in threads):
        raise ValueError(f"threads must be >= 1, got {list(threads)}")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    if compile_mode is not None and "compile" not in backends:
        raise ValueError("a compile mode needs the compile backend (--backend compile)")
    if TUNED in backends:
        check_tuned(channels_last=channels_last, reparam=reparam, jobs=jobs)
    if peak_tflops is not None and peak_tflops <= 0:
        raise ValueError(f"peak TFLOP/s must be > 0, got {peak_tflops}")
    for backend in backends:
        for precision in precisions:
            unsupported_reason(backend, precision, device, channels_last)  # raises on unknown names
    sources = _sources(models if models is not None else default_models(task))
    for source in sources.values():
        for size in image_sizes:
            check_image_size(source, size)
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
        for bs in batches[mode]
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
        "batch_sizes": list(dict.fromkeys(given_batches if given_batches is not None else default_batches)),
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


def check_tuned(channels_last: bool = False, reparam: bool = False, jobs: int = 1) -> None:
    """The tuned backend chooses layout and deploy mode per model itself, in one process: refuse
    the switches it would override (ValueError)."""
    clashes = [name for name, given in (("channels_last", channels_last), ("reparam", reparam)) if given]
    if clashes:
        raise ValueError(f"the tuned backend picks the layout and deploys each model itself; drop {', '.join(clashes)}")
    if jobs > 1:
        raise ValueError("the tuned backend runs in one process (each job could pick differently); drop --jobs")


def _image_size(size: int | Sequence[int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
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

"""What a benchmark is asked (`BenchConfig`) and what it found (`BenchResult`, `BenchReport`).

The field order of `BenchResult` is the CSV column order; `docs/bench.md` documents every field.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..measure.timing import TimingPolicy


def write_json_file(data: dict, path: str | os.PathLike) -> Path:
    """`data` as indented JSON, written atomically (a temp file renamed over `path`)."""
    return _write_atomic(path, lambda f: f.write(json.dumps(data, indent=2) + "\n"))


def write_csv_file(rows: list[dict], columns: list[str], path: str | os.PathLike) -> Path:
    """One CSV row per dict (keys = `columns`), written atomically."""

    def write(f) -> None:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    return _write_atomic(path, write)


def _write_atomic(path: str | os.PathLike, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        write(f)
    os.replace(tmp, path)
    return path


SCHEMA = "lowformer.bench/1"


@dataclass(frozen=True)
class BenchConfig:
    """One configuration to time."""

    model: str  # registry name, "timm:NAME", or the label of a module given directly
    mode: str = "latency"  # "throughput" or "latency" (latency is batch 1)
    task: str = "classification"  # or "detection": backbone + RetinaNet FPN neck (bench/models.py)
    device: str = "cpu"
    batch_size: int = 1
    image_size: tuple[int, int] = (224, 224)  # (H, W)
    precision: str = "fp32"  # fp32 (TF32 off), tf32, fp16 or bf16 (autocast)
    backend: str = "eager"
    compile_mode: str | None = None  # torch.compile mode for backend "compile"
    channels_last: bool = False
    reparam: bool = False
    threads: int | None = None  # intra-op threads; None: torch's default
    jobs: int = 1  # concurrent processes running this configuration
    cudnn_benchmark: bool = True
    timing: TimingPolicy = field(default_factory=TimingPolicy)
    peak_tflops: float | None = None  # device peak for MFU, overriding the built-in table

    def describe(self) -> str:
        h, w = self.image_size
        parts = [
            self.model,
            *(["detection"] if self.task == "detection" else []),
            self.mode,
            f"bs{self.batch_size}",
            f"{h}x{w}",
            self.backend,
            self.precision,
        ]
        if self.channels_last:
            parts.append("channels_last")
        if self.reparam:
            parts.append("reparam")
        if self.threads is not None:
            parts.append(f"{self.threads}thr")
        if self.jobs > 1:
            parts.append(f"{self.jobs}jobs")
        return " ".join(parts)


@dataclass
class BenchResult:
    """One row of results. Times are per forward call of the whole batch."""

    model: str
    source: str  # "lowformer", "timm" or "module"
    task: str  # "classification" or "detection" (backbone + FPN neck)
    mode: str
    device: str
    device_name: str
    batch_size: int
    image_height: int
    image_width: int
    precision: str
    backend: str
    compile_mode: str | None
    channels_last: bool
    reparam: bool
    reparam_applied: str | None  # "lowformer.deploy", "timm.utils.reparameterize_model", "none-available"
    threads: int | None  # intra-op threads used (ONNX Runtime: intra_op_num_threads)
    jobs: int
    status: str = "ok"  # "ok", "error", "oom" or "skipped"
    error: str | None = None
    timer: str | None = None  # "cuda_event" or "perf_counter"
    backend_note: str | None = None
    prepare_s: float | None = None  # trace / export / compile / capture time
    warmup_iters: int | None = None
    warmup_s: float | None = None
    iterations: int | None = None  # timed calls (all jobs together)
    timed_s: float | None = None
    latency_ms_p50: float | None = None
    latency_ms_p10: float | None = None
    latency_ms_p90: float | None = None
    latency_ms_p99: float | None = None
    latency_ms_min: float | None = None
    latency_ms_max: float | None = None
    latency_ms_mean: float | None = None
    latency_ms_std: float | None = None
    throughput_img_s: float | None = None  # batch_size / median call time, summed over jobs
    params: int | None = None
    macs: int | None = None  # per image, counted by lowformer.measure.count_macs
    achieved_tflops: float | None = None  # 2 * macs * throughput_img_s / 1e12
    peak_tflops: float | None = None
    peak_tflops_source: str | None = None  # "user" or "table:<GPU>"
    mfu: float | None = None  # achieved_tflops / peak_tflops
    peak_memory_mib: float | None = None
    memory_source: str | None = None
    tf32_matmul: bool | None = None
    tf32_cudnn: bool | None = None
    cudnn_benchmark: bool | None = None
    jobs_latency_ms_p50: list[float] | None = None  # each job's median (jobs > 1)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict:
        return asdict(self)


# Environment keys repeated on every CSV row (prefixed "env_"), so that a row stands on its own.
ENV_CSV_KEYS = ("date", "cpu", "torch", "timm", "onnxruntime", "torch_cuda", "cudnn", "gpu_driver")
CSV_COLUMNS = [f.name for f in fields(BenchResult)] + [f"env_{k}" for k in ENV_CSV_KEYS]


@dataclass
class BenchReport:
    """All results of one run, the environment they were measured in, and the settings used."""

    environment: dict
    settings: dict
    results: list[BenchResult] = field(default_factory=list)

    def correlations(self) -> list[dict]:
        from .report import correlations

        return correlations(self.results)

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "environment": self.environment,
            "settings": self.settings,
            "results": [r.to_dict() for r in self.results],
            "correlations": self.correlations(),
        }

    def table(self) -> str:
        from .report import format_report

        return format_report(self)

    def write_json(self, path: str | os.PathLike) -> Path:
        return write_json_file(self.to_dict(), path)

    def write_csv(self, path: str | os.PathLike) -> Path:
        """One row per result; lists are joined with ";"; the main environment keys end each row."""
        env = {f"env_{k}": self.environment.get(k) for k in ENV_CSV_KEYS}
        rows = []
        for r in self.results:
            row = {k: ";".join(f"{x:g}" for x in v) if isinstance(v, list) else v for k, v in r.to_dict().items()}
            rows.append({**row, **env})
        return write_csv_file(rows, CSV_COLUMNS, path)

    def plot(self, path: str | os.PathLike) -> Path:
        from .report import plot_macs_vs_speed

        return plot_macs_vs_speed(self, path)

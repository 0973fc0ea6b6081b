"""What a benchmark is asked (`BenchConfig`) and what it found (`BenchResult`, `BenchReport`), and the
MACs-vs-time rank correlations derived from the results. Records only: `lowformer.report` formats them.

The field order of `BenchResult` is the CSV column order; `docs/bench.md` documents every field.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .._io import write_csv, write_json
from ..measure import stats
from ..measure.timing import TimingPolicy

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
    backend: str = "eager"  # or "tuned": the model's fastest verified configuration (lowformer.tune)
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
    tuning: dict | None = None  # backend "tuned": every candidate the tuner tried (JSON only, not CSV)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict:
        return asdict(self)


# Environment keys repeated on every CSV row (prefixed "env_"), so that a row stands on its own.
ENV_CSV_KEYS = ("date", "cpu", "torch", "timm", "onnxruntime", "torch_cuda", "cudnn", "gpu_driver")
JSON_ONLY = ("tuning",)  # nested records: in the JSON, not in a CSV cell
CSV_COLUMNS = [f.name for f in fields(BenchResult) if f.name not in JSON_ONLY] + [f"env_{k}" for k in ENV_CSV_KEYS]


@dataclass
class BenchReport:
    """All results of one run, the environment they were measured in, and the settings used."""

    environment: dict
    settings: dict
    results: list[BenchResult] = field(default_factory=list)

    def correlations(self) -> list[dict]:
        return correlations(self.results)

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "environment": self.environment,
            "settings": self.settings,
            "results": [r.to_dict() for r in self.results],
            "correlations": self.correlations(),
        }

    def write_json(self, path: str | os.PathLike) -> Path:
        return write_json(path, self.to_dict())

    def write_csv(self, path: str | os.PathLike) -> Path:
        """One row per result; lists are joined with ";"; the main environment keys end each row."""
        env = {f"env_{k}": self.environment.get(k) for k in ENV_CSV_KEYS}
        rows = []
        for r in self.results:
            row = {k: ";".join(f"{x:g}" for x in v) if isinstance(v, list) else v for k, v in r.to_dict().items()}
            rows.append({**row, **env})
        return write_csv(path, rows, CSV_COLUMNS)


# --------------------------------------------------------------------------------------------
# MACs against measured time
# --------------------------------------------------------------------------------------------

GROUP_FIELDS = (
    "mode",
    "batch_size",
    "image_height",
    "image_width",
    "backend",
    "precision",
    "channels_last",
    "reparam",
    "threads",
    "jobs",
    "task",
)
MODE_ORDER = {"throughput": 0, "latency": 1}


def group_key(r: BenchResult) -> tuple:
    """What results comparable across models share: everything but the model (`GROUP_FIELDS`)."""
    return tuple(getattr(r, f) for f in GROUP_FIELDS)


def comparable_groups(results: Sequence[BenchResult]) -> dict[tuple, list[BenchResult]]:
    """Successful results with a MAC count, grouped by `group_key` (throughput groups first)."""
    groups: dict[tuple, list[BenchResult]] = {}
    for r in sorted(results, key=lambda r: MODE_ORDER.get(r.mode, 9)):
        if r.ok and r.macs:
            groups.setdefault(group_key(r), []).append(r)
    return groups


def correlations(results: Sequence[BenchResult]) -> list[dict]:
    """Rank correlation of counted MACs with measured time (latency_ms_p50), per comparable group.

    1.0 means MACs order the models exactly as the clock does; groups of fewer than 3 models are
    left out. (Throughput is batch / time, so its correlation is the same with the sign flipped.)
    """
    out = []
    for key, rs in comparable_groups(results).items():
        if len(rs) < 3:
            continue
        macs = [float(r.macs) for r in rs]
        times = [r.latency_ms_p50 for r in rs]
        g = dict(zip(GROUP_FIELDS, key))
        out.append(
            {
                "task": g["task"],
                "mode": g["mode"],
                "batch_size": g["batch_size"],
                "image_size": [g["image_height"], g["image_width"]],
                **{k: g[k] for k in ("backend", "precision", "channels_last", "reparam", "threads", "jobs")},
                "models": [r.model for r in rs],
                "spearman_macs_latency": stats.spearman(macs, times),
                "kendall_macs_latency": stats.kendall(macs, times),
            }
        )
    return out


def correlation_group_key(c: dict) -> tuple:
    """The `group_key` of the group a `correlations` entry was computed over."""
    h, w = c["image_size"]
    g = {**c, "image_height": h, "image_width": w, "task": c.get("task", "classification")}
    return tuple(g[f] for f in GROUP_FIELDS)

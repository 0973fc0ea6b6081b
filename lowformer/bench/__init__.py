"""`lowformer bench`: measured speed of our models and any timm model.

    from lowformer.bench import benchmark, compare
    report = benchmark(["lowformer_b1", "timm:fastvit_t8"], device="cpu", batch_sizes=[16])
    report = benchmark(["lowformer_b1", "timm:resnet50"], task="detection")   # backbone + FPN at 512
    print(report.table()); report.write_json("bench.json"); report.plot("bench.png")
    print(compare(["lowformer_b1", "lowformer_b1@backend=torchscript"], batch_size=16).table())

Layout: `timing` (timers, the warm-up/timed loop), `stats` (percentiles, ratios, rank
correlation), `env` (device, environment record, memory, peak TFLOP/s), `backends` (eager,
compile, TorchScript, ONNX Runtime, CUDA graphs; precision; reparameterisation), `models`
(names), `presets`, `runner` (sweeps, jobs), `compare` (paired rounds), `result` (records, JSON,
CSV) and `report` (table, plot). The method and every output field: docs/bench.md.
"""

from ..factory import TIMM_PREFIX
from ..measure.timing import CudaEventTimer, PerfCounterTimer, TimingPolicy, measure
from .backends import BACKENDS, PRECISIONS, reparameterize
from .compare import CompareReport, compare, parse_spec
from .models import DEFAULT_MODELS, DETECTION_MODELS, TASKS
from .presets import MODES, PRESETS
from .result import SCHEMA, BenchConfig, BenchReport, BenchResult
from .runner import Plan, benchmark, plan, run_config, run_plan

__all__ = [
    "BACKENDS",
    "DEFAULT_MODELS",
    "DETECTION_MODELS",
    "MODES",
    "PRECISIONS",
    "PRESETS",
    "SCHEMA",
    "TASKS",
    "TIMM_PREFIX",
    "BenchConfig",
    "BenchReport",
    "BenchResult",
    "CompareReport",
    "CudaEventTimer",
    "PerfCounterTimer",
    "Plan",
    "TimingPolicy",
    "benchmark",
    "compare",
    "measure",
    "parse_spec",
    "plan",
    "reparameterize",
    "run_config",
    "run_plan",
]

"""`lowformer bench`: measured speed of our models and any timm model.

    from lowformer.bench import benchmark, compare
    from lowformer.report import format_bench, format_compare, plot_bench

    report = benchmark(["lowformer_b1", "timm:fastvit_t8"], device="cpu", batch_sizes=[16])
    report = benchmark(["lowformer_b1", "timm:resnet50"], task="detection")   # backbone + FPN at 512
    print(format_bench(report)); report.write_json("bench.json"); plot_bench(report, "bench.png")
    print(format_compare(compare(["lowformer_b1", "lowformer_b1@backend=torchscript"], batch_size=16)))

Layout: `backends` (eager, compile, TorchScript, ONNX Runtime, CUDA graphs; precision;
reparameterisation), `models` (what a name builds per task), `presets`, `planner` (arguments into
configurations), `runner` (time configurations, jobs), `compare` (paired rounds) and `result` (the
records, JSON, CSV, rank correlations). Timing, statistics, the environment and the run context
are `lowformer.measure`'s; tables and plots are `lowformer.report`'s. Method and fields: docs/bench.md.
"""

from ..factory import TIMM_PREFIX
from ..measure.session import MODES
from ..measure.timing import CudaEventTimer, PerfCounterTimer, TimingPolicy, measure
from .backends import BACKENDS, PRECISIONS, reparameterize
from .compare import ComparePlan, CompareReport, compare, parse_spec, plan_compare, run_compare
from .models import DEFAULT_MODELS, DETECTION_MODELS, TASKS
from .planner import Plan, plan
from .presets import PRESETS
from .result import SCHEMA, BenchConfig, BenchReport, BenchResult
from .runner import benchmark, run_config, run_plan

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
    "ComparePlan",
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
    "plan_compare",
    "reparameterize",
    "run_compare",
    "run_config",
    "run_plan",
]

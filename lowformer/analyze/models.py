"""MACs against measured latency and throughput across a set of models (ours and timm's).

Built on the benchmark (`lowformer.bench.plan` / `run_config`): every model is timed in throughput
mode (large batch) and latency mode (batch 1) with the same settings; the analysis adds a time
budget, the rank of every model by MACs and by each measured time, and the rank correlations
(Spearman's rho, Kendall's tau-b) of MACs with time per mode. A correlation of 1 would mean MACs
order the models exactly as the clock does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .._io import write_json
from ..bench.models import DEFAULT_MODELS
from ..bench.planner import ModelArg, Plan, plan
from ..bench.presets import QUICK_TIMING
from ..bench.result import BenchReport
from ..bench.runner import run_plan
from ..measure import stats
from ..measure.timing import TimingPolicy

_logger = logging.getLogger(__name__)

SCHEMA = "lowformer.analyze.models/1"

_monotonic = time.monotonic


@dataclass
class ModelsReport:
    """The benchmark report of the model set, plus ranks and the time-budget state."""

    bench: BenchReport
    stopped: str | None = None  # "budget" when configurations were left unmeasured
    not_run: list[str] = field(default_factory=list)  # those configurations, described

    def ranks(self) -> list[dict]:
        """Per model: MACs, latency, throughput, and the rank of each (1 = fewest MACs / fastest)."""
        rows: dict[str, dict] = {}
        for r in self.bench.results:
            row = rows.setdefault(r.model, {"model": r.model, "source": r.source, "macs": r.macs, "params": r.params})
            if r.ok and r.mode == "latency":
                row["latency_ms"] = r.latency_ms_p50
            if r.ok and r.mode == "throughput":
                row["throughput_img_s"] = r.throughput_img_s
                row["throughput_batch"] = r.batch_size
        out = list(rows.values())
        for key, rank_key, sign in (
            ("macs", "rank_macs", 1),
            ("latency_ms", "rank_latency", 1),
            ("throughput_img_s", "rank_throughput", -1),
        ):
            have = [row for row in out if row.get(key) is not None]
            ranks = stats.rankdata([sign * row[key] for row in have])
            for row, rank in zip(have, ranks):
                row[rank_key] = rank
        return sorted(out, key=lambda row: (row.get("macs") is None, row.get("macs") or 0))

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "stopped": self.stopped,
            "not_run": self.not_run,
            "ranks": self.ranks(),
            "bench": self.bench.to_dict(),
        }

    def write_json(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    def write_csv(self, path: str | Path) -> Path:
        return self.bench.write_csv(path)


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
    quick: bool = False,
) -> Plan:
    """The benchmark plan of a model set: every model in throughput and latency mode, same settings.

    Args:
        models: our names, "timm:NAME", modules or (label, module) pairs; at least 3 for a correlation.
            Default: the benchmark's set.
        batch_size: throughput batch (default 256 on CUDA, 16 on CPU); latency is batch 1.
        reparam: reparameterise first (our deploy mode; timm's reparameterize_model for MobileOne,
            FastViT, RepViT): MACs are then counted on the inference-form graph too.
        timing: per configuration (default: the benchmark's, >= 3 s per configuration on CPU;
            `quick`: `QUICK_TIMING`).
    """
    return plan(
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


def run_models(plan: Plan, budget_s: float | None = None, progress: bool = False) -> ModelsReport:
    """Run a model-set plan; with `budget_s`, start no configuration after that many seconds (the rest
    are listed in `not_run`); the ranks and correlations use what was measured."""
    if budget_s is not None and budget_s < 0:
        raise ValueError(f"the time budget must be >= 0 seconds, got {budget_s}")
    start = _monotonic()

    def spent() -> bool:
        return budget_s is not None and _monotonic() - start >= budget_s

    bench = run_plan(plan, progress=progress, stop=spent)
    not_run = [c.describe() for c in plan.configs[len(bench.results) :]]
    return ModelsReport(bench, stopped="budget" if not_run else None, not_run=not_run)


def analyze_models(
    models: Sequence[ModelArg] | None = None,
    *,
    budget_s: float | None = None,
    progress: bool = False,
    **options,
) -> ModelsReport:
    """Time `models` (default: the benchmark's set) in throughput and latency mode; rank MACs vs time.

    `options` are the keyword arguments of `plan_models` (device, batch_size, image_size, precision,
    backend, channels_last, reparam, threads, timing, quick); see `run_models` for `budget_s`.
    """
    return run_models(plan_models(models, **options), budget_s=budget_s, progress=progress)

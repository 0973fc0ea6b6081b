"""MACs against measured latency and throughput across a set of models (ours and timm's).

Built on the benchmark (`lowformer.bench.plan` / `run_config`): every model is timed in throughput
mode (large batch) and latency mode (batch 1) with the same settings; the analysis adds a time
budget, the rank of every model by MACs and by each measured time, and the rank correlations
(Spearman's rho, Kendall's tau-b) of MACs with time per mode. A correlation of 1 would mean MACs
order the models exactly as the clock does.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from .._io import write_json
from ..bench.models import DEFAULT_MODELS, build_source
from ..bench.plan import ModelArg, plan
from ..bench.result import BenchReport
from ..bench.runner import run_config
from ..measure import stats
from ..measure.env import environment
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

    def plot(self, path: str | Path) -> Path:
        """The benchmark's MACs-vs-speed scatter (one panel per mode, Spearman rho in the titles)."""
        from ..report.plots import plot_models

        return plot_models(self, path)

    def table(self) -> str:
        from .report import format_models

        return format_models(self.to_dict())


def analyze_models(
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
    budget_s: float | None = None,
    progress: bool = False,
) -> ModelsReport:
    """Time `models` (default: the benchmark's set) in throughput and latency mode; rank MACs vs time.

    Args:
        models: our names, "timm:NAME", modules or (label, module) pairs; at least 3 for a correlation.
        batch_size: throughput batch (default 256 on CUDA, 16 on CPU); latency is batch 1.
        reparam: reparameterise first (our deploy mode; timm's reparameterize_model for MobileOne,
            FastViT, RepViT): MACs are then counted on the inference-form graph too.
        timing: per configuration (default: the benchmark's, >= 3 s per configuration on CPU).
        budget_s: start no new configuration after this many seconds (the rest are recorded as
            skipped, "time budget spent"); the correlations use what was measured.
    """
    if budget_s is not None and budget_s < 0:
        raise ValueError(f"the time budget must be >= 0 seconds, got {budget_s}")
    start = _monotonic()
    p = plan(
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
        timing=timing,
    )
    report = ModelsReport(BenchReport(environment=environment(p.settings["device"]), settings=p.settings))
    macs_cache: dict = {}
    label, pristine = None, None
    bar = tqdm(p.configs, desc="models", unit="config", disable=not progress, dynamic_ncols=True)
    for config in bar:
        bar.set_postfix_str(config.describe(), refresh=False)
        if budget_s is not None and (report.stopped or _monotonic() - start >= budget_s):
            report.stopped = "budget"
            report.not_run.append(config.describe())
            continue
        source = p.sources[config.model]
        if config.model != label:  # each model is built once and copied per configuration
            label, pristine = config.model, None
            gc.collect()
            try:
                pristine = build_source(source)
            except Exception:  # run_config builds it again and records the failure
                pristine = None
        result = run_config(config, source, pristine, macs_cache)
        if not result.ok:
            _logger.info("%s: %s: %s", config.describe(), result.status, result.error)
        report.bench.results.append(result)
    bar.close()
    return report

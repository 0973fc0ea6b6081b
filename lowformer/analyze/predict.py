"""Predicted time of whole models from the analytic latency model, without timing them.

`predict_models` counts every model's operator calls on the meta device (`lowformer.measure.opcost`:
shapes only, no arithmetic, any batch size) and sums the latency model's time per call
(`lowformer.analyze.latency.LatencyModel`). The result says, per model, the predicted time and
where it goes: per kind of operator, and how much of it is compute, memory and per-call overhead.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .._io import write_csv, write_json
from ..bench.models import build_source, source_kind
from ..factory import check_image_size
from ..measure.env import environment
from ..measure.macs import count_params
from ..measure.opcost import COST_CONVENTION, OpCost, count_op_costs
from ..measure.session import input_shape
from .latency import LatencyModel
from .opkinds import FIT_KINDS

_logger = logging.getLogger(__name__)

SCHEMA = "lowformer.analyze.predict/1"
PREDICTION_COLUMNS = [
    "model",
    "source",
    "batch_size",
    "image_size",
    "params",
    "macs",
    "flops",
    "bytes",
    "calls",
    "predicted_ms",
    "compute_ms",
    "memory_ms",
    "serial_ms",
    "overhead_ms",
    "fresh_pages_ms",
    "reuse_ms",
]


def predict_costs(costs: Sequence[OpCost], model: LatencyModel) -> dict:
    """The prediction of one forward pass from its operator costs: total, per fit kind, per term.

    `compute_ms`, `memory_ms`, `serial_ms`, `overhead_ms`, `fresh_pages_ms` and `reuse_ms` split the
    total by what dominates each call's roofline term (the larger of compute and memory) at all threads,
    what running partly on fewer threads adds to it (`LatencyModel.serial_factor`), every call's
    overhead, the page faults of outputs larger than glibc serves from reused memory
    (`Ceilings.fresh_pages_s`), and what reading inputs still in cache changes (negative: saved;
    `LatencyModel.cached_share`).
    """
    ops = model.predict(costs)
    by_kind: dict[str, dict] = {}
    compute = memory = serial = overhead = pages = reuse = 0.0
    for op in ops:
        k = by_kind.setdefault(op["fit_kind"], {"calls": 0, "predicted_ms": 0.0, "flops": 0, "bytes": 0})
        k["calls"] += 1
        k["predicted_ms"] += op["predicted_s"] * 1e3
        k["flops"] += op["flops"]
        k["bytes"] += op["bytes"]
        roof = max(op["compute_s"], op["memory_s"])
        compute += roof if op["compute_s"] >= op["memory_s"] else 0.0
        memory += roof if op["compute_s"] < op["memory_s"] else 0.0
        serial += op["serial_s"]
        overhead += op["overhead_s"]
        pages += op["fresh_pages_s"]
        reuse += op["reuse_s"]
    order = {k: i for i, k in enumerate(FIT_KINDS)}
    return {
        "predicted_ms": sum(op["predicted_s"] for op in ops) * 1e3,
        "compute_ms": compute * 1e3,
        "memory_ms": memory * 1e3,
        "serial_ms": serial * 1e3,
        "overhead_ms": overhead * 1e3,
        "fresh_pages_ms": pages * 1e3,
        "reuse_ms": reuse * 1e3,
        "flops": sum(c.flops for c in costs),
        "bytes": sum(c.bytes for c in costs),
        "calls": len(costs),
        "by_kind": dict(sorted(by_kind.items(), key=lambda kv: order.get(kv[0], len(order)))),
    }


@dataclass
class PredictionReport:
    """Predictions for a set of models at one batch size and image size."""

    environment: dict
    settings: dict
    latency_model: dict  # ceilings and factors (no samples)
    models: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "environment": self.environment,
            "settings": self.settings,
            "latency_model": self.latency_model,
            "cost_convention": COST_CONVENTION,
            "models": self.models,
        }

    def write_json(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    def write_csv(self, path: str | Path) -> Path:
        rows = [{**m, "image_size": "x".join(map(str, m["image_size"]))} for m in self.models]
        return write_csv(path, rows, PREDICTION_COLUMNS)


def model_summary(model: LatencyModel) -> dict:
    """What a prediction was made with: the ceilings and the fitted factors (not the samples)."""
    data = model.to_dict()
    data.pop("samples", None)
    if "elements" in data["settings"]:  # the refit's summary, not its samples
        data["settings"] = {**data["settings"], "elements": {**data["settings"]["elements"], "samples": []}}
    return data


def predict_model(source, model: LatencyModel, batch_size: int, image_size: tuple[int, int]) -> dict:
    """One model's prediction record (see `predict_costs`), with its parameters and MACs."""
    module = build_source(source)
    h, w = check_image_size(source, image_size)
    costs = count_op_costs(module, input_shape(module, batch_size, (h, w)))
    params, _ = count_params(module)
    macs = sum(sum(c.macs.values()) for c in costs) // batch_size
    return {
        "model": source if isinstance(source, str) else type(source).__name__,
        "source": source_kind(source),
        "batch_size": batch_size,
        "image_size": [h, w],
        "params": params,
        "macs": macs,
        **predict_costs(costs, model),
    }


def predict_models(
    models: Sequence, model: LatencyModel, *, batch_size: int = 1, image_size: int | tuple[int, int] = 224
) -> PredictionReport:
    """Predict the time per forward call of every model (ours, "timm:NAME" or a module) at one batch
    size; nothing is timed. MACs are per image, as everywhere else."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    for source in models:
        check_image_size(source, size)
    settings = {
        "models": [m if isinstance(m, str) else type(m).__name__ for m in models],
        "batch_size": batch_size,
        "image_size": list(size),
        "device": model.ceilings.device,
        "precision": model.ceilings.precision,
        "threads": model.ceilings.threads,
        "clock": model.ceilings.clock,
        "memory": model.ceilings.memory,
    }
    report = PredictionReport(environment(model.ceilings.device), settings, model_summary(model))
    for source in models:
        report.models.append(predict_model(source, model, batch_size, size))
    return report

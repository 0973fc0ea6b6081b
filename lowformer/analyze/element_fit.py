"""Refining the latency model on design-element sweeps: one time scale per operator kind, fitted so
that the predicted time of whole blocks (`lowformer analyze elements`) matches their measured time.

The operator sweep (`lowformer.analyze.latency`) times each kind alone, two calls per case and round.
Inside a block an operator runs after its neighbours: its input is often still in the caches, the threads are
already awake, and a convolution may pick another kernel for the shapes a block gives it. The element
sweeps time exactly such blocks (fused and unfused MBConvs, LowFormer blocks with and without
attention, norms and activations after a conv, upsamplers) over a channels x resolution grid, so they
say how far a kind's operator-sweep time is off inside a network.

For every measured side of every cell, the side is rebuilt and counted on the meta device, and the
operator fit predicts its time per kind, P[i, k]. The scales s_k minimise

    mean_i (log(sum_k s_k P[i, k]) - log T_i)^2 + PRIOR * sum_k (log s_k)^2

over the kinds that carry at least `MIN_SHARE` of the predicted time of at least `MIN_SAMPLES` sides
(the others keep 1: the sweeps cannot tell them apart), clamped to [1/10, 10]. The prior keeps a
kind that is never alone near the operator sweep's value. No model the prediction is judged on is
ever used: the elements are blocks built at a grid of sizes, not models.
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..errors import LowformerRuntimeError
from ..measure.opcost import count_op_costs
from .cells import SCHEMA as ELEMENTS_SCHEMA
from .elements import get_pair
from .latency import LatencyModel

PRIOR = 1e-3  # as the operator fit's: only for kinds the sweeps cannot tell
MIN_SHARE = 0.05
MIN_SAMPLES = 3
SCALE_RANGE = (0.1, 10.0)


@dataclass
class ElementSample:
    """One measured side of one element cell: its measured time and the operator fit's time per kind."""

    pair: str
    side: str
    channels: int
    resolution: int
    batch_size: int
    time_s: float
    predicted_s: dict[str, float]

    def to_dict(self) -> dict:
        return asdict(self)


def read_element_results(paths: Sequence[str | Path]) -> list[tuple[Path, dict]]:
    """The `analyze elements` result files among `paths` (files, or folders holding elements-*.json).

    FileNotFoundError for a path that does not exist or a folder without results; LowformerRuntimeError
    for a file that is not an elements result."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("elements-*.json"))
            if not found:
                raise FileNotFoundError(
                    f"{p}: no elements-*.json in this folder; run `lowformer analyze elements --out {p}` first"
                )
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(
                f"{p}: no such file or folder (give `analyze elements` results: a JSON file or its folder)"
            )
    out = []
    for f in dict.fromkeys(files):
        try:
            data = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LowformerRuntimeError(f"{f}: not readable as an elements result ({e})") from e
        schema = data.get("schema") if isinstance(data, dict) else None
        if schema != ELEMENTS_SCHEMA:
            raise LowformerRuntimeError(
                f"{f}: not an `analyze elements` result (schema {schema!r}, expected {ELEMENTS_SCHEMA!r})"
            )
        out.append((f, data))
    return out


def check_compatible(path: Path, settings: dict, model: LatencyModel) -> None:
    """ValueError when a sweep was measured under other settings than the model's calibration."""
    c = model.ceilings
    wanted = {
        "device": str(c.device),
        "precision": c.precision,
        "threads": c.threads,
        "backend": "eager",
        "channels_last": False,
    }
    got = {key: settings.get(key) for key in wanted}
    if not str(c.device).startswith("cpu"):
        wanted.pop("threads")
    wrong = [f"{k} {got[k]!r} (calibration: {v!r})" for k, v in wanted.items() if got[k] != v]
    if c.clock != "wall":
        wrong.append(f"clock wall (calibration: {c.clock!r}; element sweeps time the wall clock)")
    if c.memory != "default":
        wrong.append(f"memory default (calibration: {c.memory!r}; element sweeps use the default allocator)")
    if wrong:
        raise ValueError(
            f"{path}: measured under other settings than the calibration: {'; '.join(wrong)}. Run the sweep "
            "and the calibration with the same --device, --precision and --threads, eager, NCHW, without "
            "--clock cpu or --keep-memory"
        )


def element_samples(
    results: Sequence[tuple[Path, dict]],
    model: LatencyModel,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[ElementSample], list[str]]:
    """(samples, notes): every measured side of every cell, predicted per kind by `model`'s operator
    fit (its element scales left out). A pair that is not registered here is left out, with a note.
    `progress(done, total)` is called per cell."""
    base = without_element_scales(model)
    for path, data in results:
        check_compatible(path, data.get("settings", {}), base)
    cells = [(path, data, cell) for path, data in results for cell in data.get("cells", [])]
    cells = [(path, data, cell) for path, data, cell in cells if cell.get("status") == "ok"]
    samples, notes = [], []
    for i, (path, data, cell) in enumerate(cells):
        if progress is not None:
            progress(i, len(cells))
        batch = int(data.get("settings", {}).get("batch_size") or 1)
        try:
            pair = get_pair(cell["pair"])
        except ValueError:
            note = f"{path.name}: pair {cell['pair']!r} is not registered here (pass its --import); left out"
            if note not in notes:
                notes.append(note)
            continue
        sides = {s.label: s for s in pair.sides}
        c, r = int(cell["channels"]), int(cell["resolution"])
        for measured in cell.get("sides", []):
            side, t_ms = sides.get(measured.get("label")), measured.get("time_ms_p50")
            if side is None or not t_ms or t_ms <= 0:
                continue
            with torch.random.fork_rng(devices=[]):
                module = side.build(c, r).eval()
            by_kind: dict[str, float] = {}
            for call in base.predict(count_op_costs(module, (batch, c, r, r))):
                by_kind[call["fit_kind"]] = by_kind.get(call["fit_kind"], 0.0) + call["predicted_s"]
            samples.append(ElementSample(pair.name, side.label, c, r, batch, t_ms / 1e3, by_kind))
    if progress is not None:
        progress(len(cells), len(cells))
    return samples, notes


def without_element_scales(model: LatencyModel) -> LatencyModel:
    """The operator sweep's fit alone: every kind's element scale back at 1."""
    factors = {k: replace(f, element_scale=1.0) for k, f in model.factors.items()}
    settings = {k: v for k, v in model.settings.items() if k != "elements"}
    return replace(model, factors=factors, settings=settings)


def _predicted(samples: Sequence[ElementSample], kinds: Sequence[str]) -> np.ndarray:
    return np.array([[s.predicted_s.get(k, 0.0) for k in kinds] for s in samples], dtype=float)


def fit_element_scales(samples: Sequence[ElementSample]) -> dict[str, float]:
    """The per-kind scales (see the module's docstring); kinds the sweeps cannot tell keep 1."""
    if not samples:
        raise ValueError("no measured element sides to fit on")
    kinds = sorted({k for s in samples for k in s.predicted_s})
    predicted = _predicted(samples, kinds)
    share = predicted / predicted.sum(1, keepdims=True)
    fitted = [j for j in range(len(kinds)) if (share[:, j] >= MIN_SHARE).sum() >= MIN_SAMPLES]
    if not fitted:
        return {}
    p = torch.tensor(predicted, dtype=torch.float64)
    log_t = torch.log(torch.tensor([s.time_s for s in samples], dtype=torch.float64))
    index = torch.tensor(fitted)
    z = torch.zeros(len(fitted), dtype=torch.float64, requires_grad=True)
    lo, hi = math.log(SCALE_RANGE[0]), math.log(SCALE_RANGE[1])

    def loss_of(z: torch.Tensor) -> torch.Tensor:
        scale = torch.ones(len(kinds), dtype=torch.float64).index_put((index,), torch.exp(z.clamp(lo, hi)))
        return ((torch.log(p @ scale) - log_t) ** 2).mean() + PRIOR * (z**2).sum()

    with torch.enable_grad():
        opt = torch.optim.LBFGS([z], lr=1.0, max_iter=500, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = loss_of(z)
            loss.backward()
            return loss

        opt.step(closure)
    values = torch.exp(z.detach().clamp(lo, hi)).tolist()
    return {kinds[j]: v for j, v in zip(fitted, values)}


def _median_error(samples: Sequence[ElementSample], scales: dict[str, float]) -> float:
    kinds = sorted({k for s in samples for k in s.predicted_s})
    pred = _predicted(samples, kinds) @ np.array([scales.get(k, 1.0) for k in kinds])
    return float(np.median(np.abs(pred / np.array([s.time_s for s in samples]) - 1)))


def refine_latency_model(
    model: LatencyModel, paths: Sequence[str | Path], progress: Callable[[int, int], None] | None = None
) -> tuple[LatencyModel, dict]:
    """`model` with its element scales fitted on the `analyze elements` results at `paths`, and a summary
    (also kept in the model's settings["elements"]): the files, how many sides, the scales, and the
    median error of the element sides before and after."""
    return refine_on_results(model, read_element_results(paths), progress)


def refine_on_results(
    model: LatencyModel,
    results: Sequence[tuple[Path, dict]],
    progress: Callable[[int, int], None] | None = None,
) -> tuple[LatencyModel, dict]:
    """`refine_latency_model` on results already read by `read_element_results`."""
    samples, notes = element_samples(results, model, progress)
    scales = fit_element_scales(samples)
    base = without_element_scales(model)
    factors = dict(base.factors)
    for kind, scale in scales.items():
        if kind in factors:
            factors[kind] = replace(factors[kind], element_scale=scale)
        else:  # a kind without factors of its own borrows the fallback's
            factors[kind] = replace(base.factors_of(kind), element_scale=scale, samples=0, median_abs_error=None)
    summary = {
        "files": [str(p) for p, _ in results],
        "dates": sorted({d.get("environment", {}).get("date", "") for _, d in results}),
        "batch_sizes": sorted({s.batch_size for s in samples}),
        "pairs": sorted({s.pair for s in samples}),
        "sides": len(samples),
        "scales": scales,
        "median_abs_error_before": _median_error(samples, {}),
        "median_abs_error_after": _median_error(samples, scales),
        "notes": notes,
        "fitted": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "samples": [s.to_dict() for s in samples],
    }
    return replace(base, factors=factors, settings={**base.settings, "elements": summary}), summary

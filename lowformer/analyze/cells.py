"""The records of a design-element sweep: every side's MACs and times per cell, the comparison rows
derived from them (the CSV), and their summary per comparison. Data only: `lowformer.report` formats
them; `sweep` produces them.

Ratios are always first side over other side: `time_ratio = time(a) / time(b)`, `mac_ratio =
macs(a) / macs(b)`; below 1 means the first side is cheaper.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .._io import write_csv, write_json
from ..measure import stats
from .elements import ElementPair

SCHEMA = "lowformer.analyze.elements/1"

# Ratios within this factor of 1 count as equal MACs (rounding in odd sizes, tiny side branches).
MAC_TIE = 1.02


@dataclass
class SideResult:
    """One side of one cell. MACs are per image (batch 1); times are per call of the whole batch."""

    label: str
    macs: int
    params: int
    by_op: dict[str, int] = field(default_factory=dict)
    time_ms_p50: float | None = None
    time_ms_p10: float | None = None
    time_ms_p90: float | None = None
    iterations: int = 0
    round_medians_ms: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CellResult:
    """One (pair, channels, resolution) cell: every side's MACs and, when measured, its times.

    status: "ok", "error", "oom", "skipped" (over the MAC cap, or the pair's own check) or
    "not-run" (time budget spent, or interrupted; a later run measures it).
    """

    pair: str
    channels: int
    resolution: int
    status: str
    sides: list[SideResult]
    error: str | None = None
    cached: bool = False
    key: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict:
        return {
            "pair": self.pair,
            "channels": self.channels,
            "resolution": self.resolution,
            "status": self.status,
            "error": self.error,
            "cached": self.cached,
            "key": self.key,
            "sides": [s.to_dict() for s in self.sides],
        }

    @classmethod
    def from_dict(cls, d: dict) -> CellResult:
        return cls(
            pair=d["pair"],
            channels=d["channels"],
            resolution=d["resolution"],
            status=d["status"],
            error=d.get("error"),
            cached=d.get("cached", False),
            key=d.get("key"),
            sides=[SideResult(**s) for s in d["sides"]],
        )


ROW_COLUMNS = [
    "pair",
    "side_a",
    "side_b",
    "channels",
    "resolution",
    "status",
    "macs_a",
    "macs_b",
    "params_a",
    "params_b",
    "time_a_ms",
    "time_b_ms",
    "time_a_ms_p10",
    "time_a_ms_p90",
    "time_b_ms_p10",
    "time_b_ms_p90",
    "mac_ratio",
    "time_ratio",
    "time_ratio_min",
    "time_ratio_max",
    "mac_error",
    "cheaper_by_macs",
    "cheaper_by_time",
    "disagree",
    "rounds",
    "cached",
    "error",
    "mode",
    "batch_size",
    "device",
    "device_name",
    "precision",
    "backend",
    "channels_last",
]


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def comparison_row(cell: CellResult, a: SideResult, b: SideResult) -> dict:
    """One CSV row: side `a` (the pair's first) against side `b` in this cell.

    mac_ratio = macs(a) / macs(b) and time_ratio = median over rounds of time(a) / time(b); below 1
    means `a` is cheaper. cheaper_by_time names the side faster in *every* round ("tie" when the
    rounds disagree); disagree is true when MACs and time each pick a side and pick different ones.
    mac_error = time_ratio / mac_ratio: 1 when MACs predict the time ratio exactly.
    """
    row: dict = {
        "pair": cell.pair,
        "side_a": a.label,
        "side_b": b.label,
        "channels": cell.channels,
        "resolution": cell.resolution,
        "status": cell.status,
        "macs_a": a.macs,
        "macs_b": b.macs,
        "params_a": a.params,
        "params_b": b.params,
        "mac_ratio": _ratio(a.macs, b.macs),
        "cached": cell.cached,
        "error": cell.error,
    }
    mac_ratio = row["mac_ratio"]
    if mac_ratio is None:
        row["cheaper_by_macs"] = "tie" if a.macs == b.macs else None
    elif mac_ratio < 1 / MAC_TIE:
        row["cheaper_by_macs"] = a.label
    elif mac_ratio > MAC_TIE:
        row["cheaper_by_macs"] = b.label
    else:
        row["cheaper_by_macs"] = "tie"
    per_round = [ta / tb for ta, tb in zip(a.round_medians_ms, b.round_medians_ms) if tb > 0]
    if cell.ok and per_round:
        s = stats.ratio_summary(per_round)
        row.update(
            time_a_ms=a.time_ms_p50,
            time_b_ms=b.time_ms_p50,
            time_a_ms_p10=a.time_ms_p10,
            time_a_ms_p90=a.time_ms_p90,
            time_b_ms_p10=b.time_ms_p10,
            time_b_ms_p90=b.time_ms_p90,
            time_ratio=s["median"],
            time_ratio_min=s["min"],
            time_ratio_max=s["max"],
            rounds=len(per_round),
        )
        row["cheaper_by_time"] = a.label if s["max"] < 1 else b.label if s["min"] > 1 else "tie"
        row["mac_error"] = s["median"] / mac_ratio if mac_ratio else None
        decided = {row["cheaper_by_macs"], row["cheaper_by_time"]} - {"tie", None}
        row["disagree"] = len(decided) == 2
    return {k: row.get(k) for k in ROW_COLUMNS if k in row}


@dataclass
class ElementReport:
    """Every cell of a sweep, the settings it ran with and the environment it was measured in."""

    environment: dict
    settings: dict
    pairs: list[ElementPair]
    cells: list[CellResult] = field(default_factory=list)
    stopped: str | None = None  # "budget" or "interrupted" when cells were left unmeasured

    def rows(self) -> list[dict]:
        """One row per cell and compared side (a pair of three sides gives two rows per cell)."""
        return element_rows(self.to_dict())

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.cells:
            out[c.status] = out.get(c.status, 0) + 1
        return out

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "environment": self.environment,
            "settings": self.settings,
            "pairs": [pair_info(p) for p in self.pairs],
            "stopped": self.stopped,
            "cells": [c.to_dict() for c in self.cells],
        }

    def write_json(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    def write_csv(self, path: str | Path) -> Path:
        return write_csv(path, self.rows(), ROW_COLUMNS)


def element_rows(data: dict) -> list[dict]:
    """The comparison rows (CSV rows) of a sweep, from its dict form (`ElementReport.to_dict()` or
    the JSON file): for every cell, each side after the first against the first."""
    settings, env = data["settings"], data["environment"]
    shared = {k: settings.get(k) for k in ("mode", "batch_size", "device", "precision", "backend", "channels_last")}
    shared["device_name"] = env.get("device_name")
    labels = {p["name"]: [s["label"] for s in p["sides"]] for p in data["pairs"]}
    out = []
    for d in data["cells"]:
        cell = CellResult.from_dict(d)
        sides = {s.label: s for s in cell.sides}
        first, *others = labels[cell.pair]
        for other in others:
            if first in sides and other in sides:
                row = comparison_row(cell, sides[first], sides[other])
            else:  # the cell failed before its sides were counted
                row = {"pair": cell.pair, "side_a": first, "side_b": other, "channels": cell.channels}
                row.update(resolution=cell.resolution, status=cell.status, cached=False, error=cell.error)
            out.append({k: {**row, **shared}.get(k) for k in ROW_COLUMNS})
    return out


def pair_info(pair: ElementPair) -> dict:
    return {
        "name": pair.name,
        "description": pair.description,
        "claim": pair.claim,
        "version": pair.version,
        "sides": [{"label": s.label, "description": s.description} for s in pair.sides],
    }


def comparisons(data: dict) -> list[tuple[dict, str, list[dict]]]:
    """(pair info, other side's label, its rows) for every comparison of a sweep's dict form."""
    all_rows = element_rows(data)
    out = []
    for pair in data["pairs"]:
        for side in pair["sides"][1:]:
            rows = [r for r in all_rows if r["pair"] == pair["name"] and r["side_b"] == side["label"]]
            out.append((pair, side["label"], rows))
    return out


def summarize_comparison(rows: Sequence[dict]) -> dict:
    """Counts and ranges of one comparison (one pair, one other side) over its cells."""
    measured = [r for r in rows if r["status"] == "ok" and r.get("time_ratio") is not None]
    a = rows[0]["side_a"] if rows else None
    b = rows[0]["side_b"] if rows else None
    by_status: dict[str, int] = {}
    for r in rows:
        if r not in measured:
            by_status[r["status"]] = by_status.get(r["status"], 0) + 1
    time_ratios = [r["time_ratio"] for r in measured]
    mac_ratios = [r["mac_ratio"] for r in measured if r.get("mac_ratio") is not None]
    errors = [r["mac_error"] for r in measured if r.get("mac_error") is not None]
    return {
        "side_a": a,
        "side_b": b,
        "cells": len(rows),
        "measured": len(measured),
        "not_measured": by_status,
        "disagree": sum(bool(r.get("disagree")) for r in measured),
        "faster_a": sum(r.get("cheaper_by_time") == a for r in measured),
        "faster_b": sum(r.get("cheaper_by_time") == b for r in measured),
        "time_tie": sum(r.get("cheaper_by_time") == "tie" for r in measured),
        "fewer_macs_a": sum(r.get("cheaper_by_macs") == a for r in measured),
        "fewer_macs_b": sum(r.get("cheaper_by_macs") == b for r in measured),
        "mac_tie": sum(r.get("cheaper_by_macs") == "tie" for r in measured),
        "time_ratio_min": min(time_ratios) if time_ratios else None,
        "time_ratio_max": max(time_ratios) if time_ratios else None,
        "mac_ratio_min": min(mac_ratios) if mac_ratios else None,
        "mac_ratio_max": max(mac_ratios) if mac_ratios else None,
        "mac_error_median": statistics.median(errors) if errors else None,
    }


def load_report(path: str | Path) -> dict:
    """An `elements.json` as written by `ElementReport.write_json` (plain dict, schema checked)."""
    data = json.loads(Path(path).read_text())
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not an element sweep (schema {data.get('schema')!r}, expected {SCHEMA!r})")
    return data

"""Roofline attribution: every operator call of a model placed against the device's measured ceilings.

For each top-level ATen call of a forward pass this joins what it costs (`lowformer.measure.opcost`:
FLOPs and bytes moved, with the cache assumption stated there) with what it took (the profiler's
time of that call, `lowformer.measure.profiler.top_level_ops`), and with the ceilings of the device
(`lowformer.measure.calibrate`): arithmetic intensity (FLOPs per byte), achieved FLOP/s and bytes/s,
each as a share of its ceiling, and the *bound*: what would limit the call at the ceilings
("compute" above the ridge, "memory" below it, "overhead" when both its arithmetic and its traffic
would take less than one call's overhead). Summaries per operator kind and per stage (the model's
top-level child module, split by index where it is a sequence of blocks: `stages.N`, `blocks.N`)
tell where time goes and why.

Records only: `lowformer.report` draws the roofline and formats the tables.
"""

from __future__ import annotations

import difflib
import statistics
from collections.abc import Sequence

from torch import nn

from ..measure.calibrate import BOUNDS, Ceilings
from ..measure.opcost import OpCost
from ..measure.profiler import OpCall
from .opkinds import KINDS, classify_op


def block_sequences(model: nn.Module) -> set[str]:
    """The model's top-level children that are sequences of blocks (every item has children of its
    own): their items are the stages. A sequence of plain layers (a stem) is one stage."""
    out = set()
    for name, child in model.named_children():
        items = list(child.children())
        if isinstance(child, (nn.Sequential, nn.ModuleList)) and len(items) > 1:
            if all(next(item.children(), None) is not None for item in items):
                out.add(name)
    return out


def stage_of(module: str, sequences: set[str] = frozenset()) -> str:
    """The stage a module path belongs to: its first component, with the item index inside one of
    `sequences` (`stages.2.blocks.0.attn` -> `stages.2`, `stem.conv` -> `stem`); "(model)" for
    calls made by the model's own forward."""
    if not module:
        return "(model)"
    parts = module.split(".")
    if len(parts) > 1 and parts[0] in sequences:
        return f"{parts[0]}.{parts[1]}"
    return parts[0]


def match_calls(costs: Sequence[OpCost], calls: Sequence[OpCall], iters: int) -> list[list[float]]:
    """The profiled times (us) of each cost's call over the `iters` profiled passes.

    The profiled passes run the same Python code as the counted one, so call i of every pass is
    cost i; where a pass differs (a model that takes another branch when counted), the calls are
    aligned by name and an unmatched cost gets no time.
    """
    names = [c.name for c in costs]
    per_pass = len(calls) // iters if iters else 0
    out: list[list[float]] = [[] for _ in costs]
    if per_pass * iters == len(calls) and all(
        [c.name for c in calls[k * per_pass : (k + 1) * per_pass]] == names for k in range(iters)
    ):
        for k in range(iters):
            for i in range(per_pass):
                out[i].append(calls[k * per_pass + i].time_us)
        return out
    start = 0
    for _ in range(iters):
        chunk = calls[start : start + max(per_pass, 1)]
        start += len(chunk)
        matcher = difflib.SequenceMatcher(a=names, b=[c.name for c in chunk], autojunk=False)
        for block in matcher.get_matching_blocks():
            for j in range(block.size):
                out[block.a + j].append(chunk[block.b + j].time_us)
    return out


def op_records(
    costs: Sequence[OpCost], times_us: Sequence[Sequence[float]], ceilings: Ceilings, sequences: set[str] = frozenset()
) -> list[dict]:
    """One record per top-level call: cost, median profiled time, achieved rates and shares, bound."""
    records = []
    for cost, times in zip(costs, times_us):
        time_s = statistics.median(times) / 1e6 if times else None
        achieved_flops = cost.flops / time_s if time_s and cost.flops else None
        achieved_bytes = cost.bytes / time_s if time_s and cost.bytes else None
        records.append(
            {
                "index": cost.index,
                "op": cost.name,
                "kind": classify_op(cost.name, cost.input_shapes, cost.transposed),
                "module": cost.module,
                "stage": stage_of(cost.module, sequences),
                "flops": cost.flops,
                "bytes_read": cost.bytes_read,
                "bytes_weights": cost.bytes_weights,
                "bytes_written": cost.bytes_written,
                "bytes": cost.bytes,
                "intensity": cost.intensity,
                "time_ms": None if time_s is None else time_s * 1e3,
                "achieved_flops_per_s": achieved_flops,
                "achieved_bytes_per_s": achieved_bytes,
                "compute_share": achieved_flops / ceilings.flops_per_s if achieved_flops else None,
                "bandwidth_share": achieved_bytes / ceilings.bytes_per_s if achieved_bytes else None,
                "bound": ceilings.bound(cost.flops, cost.bytes),
            }
        )
    return records


def summarize(records: Sequence[dict], key: str, ceilings: Ceilings, order: Sequence[str] | None = None) -> list[dict]:
    """Totals per `key` ("kind" or "stage"): calls, time, FLOPs, bytes, achieved rates and shares of the
    ceilings, and the time spent in calls of each bound. Groups in `order` first, then by first call."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r[key], []).append(r)
    names = [k for k in (order or []) if k in groups] + [k for k in groups if k not in (order or [])]
    total_ms = sum(r["time_ms"] or 0.0 for r in records) or 1.0
    out = []
    for name in names:
        rs = groups[name]
        time_ms = sum(r["time_ms"] or 0.0 for r in rs)
        flops = sum(r["flops"] for r in rs)
        nbytes = sum(r["bytes"] for r in rs)
        time_s = time_ms / 1e3
        by_bound = {b: sum(r["time_ms"] or 0.0 for r in rs if r["bound"] == b) for b in BOUNDS}
        row = {
            key: name,
            "calls": len(rs),
            "time_ms": time_ms,
            "time_share": time_ms / total_ms,
            "flops": flops,
            "bytes": nbytes,
            "intensity": flops / nbytes if nbytes else None,
            "achieved_flops_per_s": flops / time_s if time_s and flops else None,
            "achieved_bytes_per_s": nbytes / time_s if time_s and nbytes else None,
            "time_ms_by_bound": by_bound,
            "bound": max(by_bound, key=by_bound.get) if time_ms else None,
        }
        row["compute_share"] = (
            row["achieved_flops_per_s"] / ceilings.flops_per_s if row["achieved_flops_per_s"] else None
        )
        row["bandwidth_share"] = (
            row["achieved_bytes_per_s"] / ceilings.bytes_per_s if row["achieved_bytes_per_s"] else None
        )
        if key == "kind":
            row["label"] = KINDS.get(name, name)
        out.append(row)
    return out


def attribute(
    costs: Sequence[OpCost], calls: Sequence[OpCall], iters: int, ceilings: Ceilings, model: nn.Module | None = None
) -> dict:
    """The roofline section of a profile: ceilings, per-call records, per-kind and per-stage summaries
    (stages from `model`'s structure, see `block_sequences`)."""
    sequences = block_sequences(model) if model is not None else set()
    records = op_records(costs, match_calls(costs, calls, iters), ceilings, sequences)
    return {
        "ceilings": ceilings.to_dict(),
        "ops": records,
        "by_kind": summarize(records, "kind", ceilings, order=list(KINDS)),
        "by_stage": summarize(records, "stage", ceilings),
        "unmatched_calls": sum(r["time_ms"] is None for r in records),
    }

"""Where a model's time goes, per operator kind, against where its MACs are.

`profile_model` runs the model eagerly under `torch.profiler` (`lowformer.measure.profiler`) and
attributes the time of every *top-level* ATen operator (one called from Python, not from inside
another ATen operator; its time includes its children, e.g. `aten::conv2d` includes the oneDNN or
cuDNN kernel) to a kind:

    dense conv, depthwise conv, transposed conv, linear, attention, norm, activation,
    reshape/copy, other

Convolutions are told apart by their recorded weight shape, with the rule the MAC counter uses
(weight (C_out, C_in / groups, k, k) with C_in / groups == 1 and C_in > 1 is depthwise). The MAC
share per kind comes from `count_macs` (dense conv = "conv", attention = "attention_matmul").
Time is host time on CPU and GPU kernel time on CUDA. The profiler adds overhead per operator, so
the wall time per call is measured separately, without it, and reported beside the profile.

Given the device's measured ceilings (`lowformer.measure.calibrate`), the profile also places every
call on the roofline (`lowformer.analyze.roofline`): FLOPs, bytes moved, intensity, achieved rates
as shares of the ceilings, and what bounds it, summarised per kind and per stage.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .._io import write_csv, write_json
from ..bench.backends import PRECISIONS, prepare, unsupported_reason
from ..bench.models import build_source, source_kind
from ..bench.presets import QUICK_TIMING, default_batch_size
from ..factory import check_image_size
from ..measure import stats
from ..measure.calibrate import Ceilings
from ..measure.env import environment, keep_freed_memory, memory_mode, resolve_device
from ..measure.macs import CONVENTION, count_macs
from ..measure.opcost import COST_CONVENTION, count_op_costs
from ..measure.profiler import OpCall, top_level_ops
from ..measure.session import batch_size_for, check_modes, input_shape, make_input, place, run_context
from ..measure.timing import TimingPolicy, check_clock, device_timer, measure
from .opkinds import KINDS, MAC_KINDS, classify_op

_logger = logging.getLogger(__name__)

SCHEMA = "lowformer.analyze.profile/1"

# the wall time per call, measured without the profiler
WALL_TIMING = TimingPolicy(warmup_iters=3, warmup_s=1.0, min_iters=10, min_s=2.0, max_s=20.0)


@dataclass
class ModelProfile:
    """The result of `profile_model`; `to_dict()` is the JSON written by `lowformer analyze model`."""

    model: str
    source: str
    environment: dict
    settings: dict
    params: int
    macs: int  # per image
    wall_ms: dict[str, float]
    kinds: list[dict] = field(default_factory=list)
    top_ops: list[dict] = field(default_factory=list)
    roofline: dict | None = None  # lowformer.analyze.roofline.attribute, when ceilings were given

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "model": self.model,
            "source": self.source,
            "environment": self.environment,
            "settings": self.settings,
            "params": self.params,
            "macs": self.macs,
            "mac_convention": CONVENTION,
            "wall_ms_p50": self.wall_ms["p50"],
            "wall_ms_p10": self.wall_ms["p10"],
            "wall_ms_p90": self.wall_ms["p90"],
            "profiled_ms_per_call": sum(k["time_ms"] for k in self.kinds),
            "kinds": self.kinds,
            "top_ops": self.top_ops,
            "roofline": self.roofline,
            "cost_convention": COST_CONVENTION if self.roofline else None,
        }

    def write_json(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    def write_csv(self, path: str | Path) -> Path:
        columns = ["kind", "label", "time_ms", "time_share", "macs", "mac_share", "ops"]
        return write_csv(path, self.kinds, columns)


def safe_name(model: str) -> str:
    """A file-name stem for a model name ("timm:fastvit_t8" -> "timm_fastvit_t8")."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in model)


def check_profile_args(
    model: nn.Module | str, device: str, mode: str, batch_size: int | None, image_size: int | Sequence[int],
    precision: str = "fp32", channels_last: bool = False, iters: int | None = None, clock: str = "wall",
    threads: int | None = None,
) -> tuple[int, tuple[int, int]]:  # fmt: skip
    """The batch size and (H, W) `profile_model` would use, or the ValueError it would raise for these
    arguments: a command asks this before work that takes minutes (a calibration)."""
    check_modes([mode])
    batch = batch_size_for(mode, batch_size, default_batch_size(device))
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    reason = unsupported_reason("eager", precision, device, channels_last)
    if reason is not None:
        raise ValueError(reason)
    if iters is not None and iters < 1:
        raise ValueError(f"at least one profiled call is needed, got iters={iters}")
    check_clock(clock, device, threads)
    return batch, check_image_size(model, image_size)


def profile_model(
    model: str | nn.Module,
    *,
    device: str | None = "auto",
    mode: str = "latency",
    batch_size: int | None = None,
    image_size: int | tuple[int, int] = 224,
    precision: str = "fp32",
    channels_last: bool = False,
    threads: int | None = None,
    iters: int | None = None,
    timing: TimingPolicy | None = None,
    quick: bool = False,
    label: str | None = None,
    clock: str = "wall",
    keep_memory: bool = False,
    ceilings: Ceilings | None = None,
) -> ModelProfile:
    """Profile one model eagerly: time per operator kind (torch.profiler) against MAC share, and with
    `ceilings`, every call on the roofline.

    Args:
        model: our name, "timm:NAME", or a module (random weights are fine: speed does not need them).
        mode: "latency" (batch 1) or "throughput" (`batch_size`, default 256 on CUDA, 16 on CPU).
        iters: profiled calls (default 20 on CUDA, 5 on CPU), after the wall-clock measurement.
        timing: the wall-clock measurement without the profiler (default: >= 1 s warm-up, >= 10
            calls and >= 2 s; `quick`: `presets.QUICK_TIMING`).
        clock: "wall", or "cpu" for the thread's CPU time (one thread on a CPU, see
            `lowformer.measure.timing.ThreadCpuTimer`); the profiler's per-call times are wall time.
        keep_memory: keep freed memory in the process while measuring
            (`lowformer.measure.env.keep_freed_memory`).
        ceilings: the device's calibration (`lowformer.measure.calibrate.calibrated`) for the roofline.
    """
    device = resolve_device(device)
    batch, (h, w) = check_profile_args(model, device, mode, batch_size, image_size, precision, channels_last, iters,
                                       clock, threads)  # fmt: skip
    cuda = device.startswith("cuda")
    iters = iters or (20 if cuda else 5)
    timing = timing or (QUICK_TIMING if quick else WALL_TIMING)
    name = model if isinstance(model, str) else label or type(model).__name__
    module = build_source(model)
    mac_report = count_macs(module, (h, w), in_chans=getattr(module, "in_chans", 3), device="cpu")

    shape = input_shape(module, batch, (h, w))
    with keep_freed_memory(keep_memory), run_context(device, precision, threads):
        x = make_input(shape, device, channels_last)
        prepared = prepare(place(module, device, channels_last), x, "eager", precision, device, threads=threads)
        timer = device_timer(device, clock) if clock == "cpu" else prepared.timer
        wall = measure(prepared.step, timer, timing)
        used_threads = torch.get_num_threads()
        memory = memory_mode()
        calls = top_level_ops(prepared.step, iters, device)
    by_kind, ops = _by_kind(calls)
    roofline = None
    if ceilings is not None:
        from .roofline import attribute

        roofline = attribute(count_op_costs(module, shape), calls, iters, ceilings, module)

    total_macs = mac_report.macs or 0
    macs_by_kind = {k: 0 for k in KINDS}
    for mac_kind, value in mac_report.by_op.items():
        macs_by_kind[MAC_KINDS[mac_kind]] += value
    profiled = sum(t for t, _ in by_kind.values())
    kinds = []
    for kind, label_ in KINDS.items():
        t_us, count = by_kind.get(kind, (0.0, 0))
        kinds.append(
            {
                "kind": kind,
                "label": label_,
                "time_ms": t_us / iters / 1e3,
                "time_share": t_us / profiled if profiled else 0.0,
                "macs": macs_by_kind[kind],
                "mac_share": macs_by_kind[kind] / total_macs if total_macs else 0.0,
                "ops": count // iters,
            }
        )
    top_ops = sorted(ops.items(), key=lambda kv: -kv[1][0])[:15]
    summary = stats.summarize_ms(wall.samples_s, prefix="t")
    settings = {
        "device": device,
        "mode": mode,
        "batch_size": batch,
        "image_size": [h, w],
        "precision": precision,
        "backend": "eager",
        "channels_last": channels_last,
        "threads": used_threads,
        "iters": iters,
        "timer": timer.name,
        "clock": clock,
        "memory": memory,
        "wall_timing": timing.to_dict(),
        "wall_iterations": len(wall.samples_s),
        "time_source": "cuda kernel time (device_time_total)" if cuda else "host time (cpu_time_total)",
    }
    return ModelProfile(
        model=name,
        source=source_kind(model),
        environment=environment(device),
        settings=settings,
        params=mac_report.params,
        macs=total_macs,
        wall_ms={"p50": summary["t_p50"], "p10": summary["t_p10"], "p90": summary["t_p90"]},
        kinds=kinds,
        top_ops=[
            {"op": op, "kind": kind, "time_ms": t / iters / 1e3, "calls": n // iters} for op, (t, n, kind) in top_ops
        ],
        roofline=roofline,
    )


def _by_kind(calls: list[OpCall]) -> tuple[dict[str, tuple[float, int]], dict[str, tuple[float, int, str]]]:
    """Time (us) and call count per operator kind and per operator name (convs split by kind)."""
    by_kind: dict[str, tuple[float, int]] = {}
    by_op: dict[str, tuple[float, int, str]] = {}
    for call in calls:
        kind = classify_op(call.name, call.input_shapes, call.transposed)
        total, count = by_kind.get(kind, (0.0, 0))
        by_kind[kind] = (total + call.time_us, count + 1)
        key = f"{call.name}[{kind}]" if kind in ("dense_conv", "depthwise_conv") else call.name
        t0, n0, _ = by_op.get(key, (0.0, 0, kind))
        by_op[key] = (t0 + call.time_us, n0 + 1, kind)
    return by_kind, by_op

"""Per-operator times of a step under `torch.profiler`: the raw material of operator-level analyses.

`top_level_ops` runs a prepared step a few times under the profiler and returns every *top-level*
ATen operator call (one called from Python, not from inside another ATen operator) with its recorded
input shapes and its time, which includes its children (`aten::conv2d` includes the oneDNN or cuDNN
kernel it launches). On CUDA the time is the kernel time on the device, on CPU the host time. What
an operator *is* (a dense or depthwise conv, a norm, ...) is the analysis' question, not this one's.

NOTE: the profiler adds overhead per operator call; measure the wall time per call separately,
without it (`lowformer.measure.timing.measure`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class OpCall:
    """One top-level ATen operator call of a profiled step."""

    name: str  # "aten::conv2d"
    input_shapes: list  # as the profiler records them
    transposed: bool | None  # the `transposed` argument of aten::convolution, when recorded
    time_us: float


def quiet_profiler() -> None:
    """Keep the profiler's C++ log (Kineto) off stderr on a machine without CUDA, where all it prints
    is a line per profiler start and stop and that no GPU was found. Kineto reads the level once,
    when the first profiler starts in the process; a user's own `KINETO_LOG_LEVEL` wins, and with
    CUDA the log is left as it is (its errors there can matter)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # above USDT (5) and ERROR (4): nothing


def top_level_ops(step: Callable[[], Any], iters: int, device: str) -> list[OpCall]:
    """Run `step` `iters` times under the profiler; every top-level ATen call of all the runs."""
    from torch.profiler import ProfilerActivity, profile

    quiet_profiler()
    cuda = str(device).startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(iters):
            step()
        if cuda:
            torch.cuda.synchronize()
    return [
        OpCall(event.name, event.input_shapes, transposed_arg(event), _event_time_us(event, cuda))
        for event in prof.events()
        if event.name.startswith("aten::") and is_top_level(event)
    ]


def transposed_arg(event) -> bool | None:
    """`transposed` of an `aten::convolution` / `aten::_convolution` event, when recorded."""
    op = event.name.split("::", 1)[-1]
    if op not in ("convolution", "_convolution"):
        return None
    concrete = getattr(event, "concrete_inputs", None) or []
    value = concrete[6] if len(concrete) > 6 else None
    return bool(value) if isinstance(value, bool) else None


def is_top_level(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return False
        parent = parent.cpu_parent
    return True


def _event_time_us(event, cuda: bool) -> float:
    if cuda:
        return float(getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0))
    return float(event.cpu_time_total)

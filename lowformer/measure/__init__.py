"""Counting and measuring, the core every speed figure of the package is built on.

`macs` (MAC and parameter counts), `opcost` (FLOPs and bytes moved per operator call), `timing`
(timers, the timing loop, the interleaved rounds), `stats` (percentiles, ratios, rank
correlations), `env` (device, environment record, switches, memory, peak TFLOP/s, the allocator
mode), `calibrate` (the device's measured ceilings), `session` (run context, input and layout,
modes, failure classification) and `profiler` (per-operator times). It imports nothing else of the
package but `lowformer.errors` and `lowformer._io`.
"""

from .calibrate import Ceilings, calibrated
from .env import environment, keep_freed_memory, resolve_device
from .macs import CONVENTION, MacReport, count_macs
from .opcost import OpCost, count_op_costs
from .session import classify_failure, make_input, place, run_context
from .timing import (
    Candidate,
    CandidateTimes,
    Rounds,
    ThreadCpuTimer,
    TimingPolicy,
    device_timer,
    interleave,
    measure,
)

__all__ = [
    "CONVENTION",
    "Candidate",
    "CandidateTimes",
    "Ceilings",
    "MacReport",
    "OpCost",
    "Rounds",
    "ThreadCpuTimer",
    "TimingPolicy",
    "calibrated",
    "classify_failure",
    "count_macs",
    "count_op_costs",
    "device_timer",
    "environment",
    "interleave",
    "keep_freed_memory",
    "make_input",
    "measure",
    "place",
    "resolve_device",
    "run_context",
]

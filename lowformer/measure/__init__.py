"""Counting and measuring, the core every speed figure of the package is built on.

`macs` (MAC and parameter counts), `timing` (timers, the timing loop, the interleaved rounds),
`stats` (percentiles, ratios, rank correlations), `env` (device, environment record, switches,
memory, peak TFLOP/s), `session` (run context, input and layout, modes, failure classification)
and `profiler` (per-operator times). It imports nothing else of the package but `lowformer.errors`.
"""

from .env import environment, resolve_device
from .macs import CONVENTION, MacReport, count_macs
from .session import classify_failure, make_input, place, run_context
from .timing import Candidate, CandidateTimes, Rounds, TimingPolicy, device_timer, interleave, measure

__all__ = [
    "CONVENTION",
    "Candidate",
    "CandidateTimes",
    "MacReport",
    "Rounds",
    "TimingPolicy",
    "classify_failure",
    "count_macs",
    "device_timer",
    "environment",
    "interleave",
    "make_input",
    "measure",
    "place",
    "resolve_device",
    "run_context",
]

"""Default settings per device, and presets that reproduce the LowFormer papers' protocols.

Explicit arguments override a preset; a preset overrides the device defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..measure.timing import TimingPolicy
from .models import DENSE_TASKS


@dataclass(frozen=True)
class Preset:
    description: str
    modes: tuple[str, ...]
    batch_sizes: tuple[int, ...] | None = None  # throughput batch sizes (latency is always batch 1)
    image_sizes: tuple[tuple[int, int], ...] = ((224, 224),)
    backends: tuple[str, ...] = ("torchscript",)
    precisions: tuple[str, ...] = ("fp32",)
    timing: TimingPolicy | None = None


PRESETS: dict[str, Preset] = {
    "paper-throughput": Preset(
        description="LowFormer papers' throughput: batch 200 at 224x224, TorchScript "
        "(trace, freeze, optimize_for_inference), fp32 (TF32 off), 10 warm-up + 100 timed calls",
        modes=("throughput",),
        batch_sizes=(200,),
        timing=TimingPolicy(warmup_iters=10, warmup_s=0.0, min_iters=100, min_s=0.0),
    ),
    "paper-latency": Preset(
        description="LowFormer papers' latency: batch 1 at 224x224, TorchScript + optimize_for_inference, "
        "fp32 (TF32 off), median of 500 timed calls after 50 warm-up calls",
        modes=("latency",),
        timing=TimingPolicy(warmup_iters=50, warmup_s=0.0, min_iters=500, min_s=0.0),
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}") from None


# The papers time detection backbones at 512x512 (with the FPN neck); ADE20K segmentation crops are
# 512x512 too.
DENSE_IMAGE_SIZE = (512, 512)


def default_image_size(task: str = "classification") -> tuple[int, int]:
    return DENSE_IMAGE_SIZE if task in DENSE_TASKS else (224, 224)


def default_batch_size(device: str, task: str = "classification") -> int:
    """Throughput batch: large on a GPU; 16 on a CPU, where larger batches only add minutes.

    Detection and segmentation (512x512, 5.2x the pixels of 224x224): 32 on a GPU, 4 on a CPU, a
    dense-prediction inference batch rather than a classifier's."""
    if task in DENSE_TASKS:
        return 32 if device.startswith("cuda") else 4
    return 256 if device.startswith("cuda") else 16


def default_timing(device: str, preset: str | None = None) -> TimingPolicy:
    """The preset's timing if it has one, else the device's: bounded by time, so the default model
    set runs in a few minutes on a 2-core CPU."""
    if preset is not None and get_preset(preset).timing is not None:
        return get_preset(preset).timing
    if device.startswith("cuda"):
        return TimingPolicy(warmup_iters=10, warmup_s=2.0, min_iters=50, min_s=5.0)
    return TimingPolicy(warmup_iters=2, warmup_s=1.0, min_iters=10, min_s=3.0, max_s=15.0)


# `--quick`: a first look in a minute, not a measurement to publish
QUICK_TIMING = TimingPolicy(warmup_iters=1, warmup_s=0.2, min_iters=3, min_s=0.5, max_s=5.0)


def default_round_timing(device: str) -> TimingPolicy:
    """One round of a paired comparison: a re-warm call, then a short burst of timed calls."""
    if device.startswith("cuda"):
        return TimingPolicy(warmup_iters=2, warmup_s=0.0, min_iters=20, min_s=0.2)
    return TimingPolicy(warmup_iters=1, warmup_s=0.0, min_iters=5, min_s=0.5)

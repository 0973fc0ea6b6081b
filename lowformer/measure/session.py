"""What every timed run shares, whatever it times (a benchmark configuration, a design-element cell, a
profiled model, a deploy candidate): the settings it runs under, its input and memory layout, the
meaning of its mode and batch size, and how a failure is classified.

- `run_context`: CUDA device, intra-op threads, the TF32 switch, cudnn.benchmark and no autograd,
  all restored after.
- `input_shape`, `make_input`, `place`: a seeded random input of the model's shape, and models and
  inputs on the device in the memory format asked for.
- `MODES`, `batch_sizes_by_mode`, `batch_size_for`: latency is batch 1 by definition; throughput
  times a batch.
- `classify_failure`: an exception that ended one run, as a recorded status ("oom" or "error") and
  a one-line message, so the run goes on.
- `frozen_heap`: cheap garbage collections between runs.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from ..errors import is_out_of_memory
from .env import cudnn_benchmark_mode, num_threads, tf32_mode

MODES = ("throughput", "latency")
LATENCY_BATCH = 1  # latency is the time of one image through the model
LATENCY_BATCH_RULE = "a batch size (--batch-size) applies to throughput mode; latency mode is batch 1 by definition"


# --------------------------------------------------------------------------------------------
# Modes and batch sizes
# --------------------------------------------------------------------------------------------


def check_modes(modes: Sequence[str]) -> tuple[str, ...]:
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    return tuple(modes)


def batch_sizes_by_mode(
    modes: Sequence[str], batch_sizes: Sequence[int] | None, default: Sequence[int]
) -> dict[str, tuple[int, ...]]:
    """The batch sizes each mode times: latency batch 1, throughput `batch_sizes` (or `default`).

    Raises:
        ValueError: an unknown mode, a batch size below 1, or batch sizes given for latency alone.
    """
    check_modes(modes)
    if batch_sizes is not None:
        if any(b < 1 for b in batch_sizes):
            raise ValueError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
        if "throughput" not in modes and set(batch_sizes) != {LATENCY_BATCH}:
            raise ValueError(LATENCY_BATCH_RULE)
    throughput = tuple(dict.fromkeys(batch_sizes if batch_sizes is not None else default))
    return {mode: throughput if mode == "throughput" else (LATENCY_BATCH,) for mode in modes}


def batch_size_for(mode: str, batch_size: int | None, default: int) -> int:
    """The one batch size of a single-mode run (see `batch_sizes_by_mode`)."""
    given = None if batch_size is None else [batch_size]
    return batch_sizes_by_mode([mode], given, [default])[mode][0]


def mode_of(batch_size: int) -> str:
    """The mode a run at one batch size measures: batch 1 is latency."""
    return "latency" if batch_size == LATENCY_BATCH else "throughput"


# --------------------------------------------------------------------------------------------
# Run context, input and layout
# --------------------------------------------------------------------------------------------


@contextmanager
def run_context(
    device: str, precision: str = "fp32", threads: int | None = None, cudnn_benchmark: bool = True
) -> Iterator[None]:
    """Everything a timed call runs under, restored after: the CUDA device, `threads` intra-op threads
    (None: torch's choice), TF32 on only for precision "tf32" (fp32 means TF32 off; fp16 and bf16
    are autocast, entered per call by the step), cudnn.benchmark, and no autograd."""
    with ExitStack() as stack:
        if str(device).startswith("cuda"):
            stack.enter_context(torch.cuda.device(torch.device(device)))
        stack.enter_context(num_threads(threads))
        stack.enter_context(tf32_mode(precision == "tf32"))
        stack.enter_context(cudnn_benchmark_mode(cudnn_benchmark))
        stack.enter_context(torch.no_grad())
        yield


def input_shape(model: nn.Module, batch_size: int, image_size: Sequence[int]) -> tuple[int, ...]:
    """(batch, the model's input channels (`in_chans`, 3 when it does not say), H, W)."""
    return (batch_size, getattr(model, "in_chans", 3), *image_size)


def make_input(shape: Sequence[int], device: str, channels_last: bool = False, seed: int = 0) -> torch.Tensor:
    """A random normal input, the same in every run (speed does not depend on the values), on `device`."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def place(obj: nn.Module | torch.Tensor, device: str, channels_last: bool = False) -> nn.Module | torch.Tensor:
    """A module (in place, as `Module.to` is) or a tensor (a copy where needed) on `device`, in
    channels_last memory format when asked."""
    obj = obj.to(device)
    return obj.to(memory_format=torch.channels_last) if channels_last else obj


# --------------------------------------------------------------------------------------------
# Failures
# --------------------------------------------------------------------------------------------


def classify_failure(e: BaseException) -> tuple[str, str]:
    """(status, message) of an exception that ended one run: status "oom" for exhausted host or
    device memory, else "error"; the message is "Type: first line of the text" (at most 500 characters)."""
    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    return ("oom" if is_out_of_memory(e) else "error"), f"{type(e).__name__}: {first}"[:500]


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Make the `gc.collect()` between two runs cheap: the objects alive when the block starts (the
    libraries' own heap, hundreds of thousands of objects) are left out of collections inside it,
    so a collection scans only what the runs created (a model, its prepared step): about a
    millisecond instead of a quarter of a second. Nested use keeps the outer freeze."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()

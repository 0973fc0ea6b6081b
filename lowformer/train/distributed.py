"""Process-group set-up from torchrun's environment, and the few collectives the trainer needs.

`torchrun --nproc-per-node N -m lowformer train ...` sets RANK, WORLD_SIZE and LOCAL_RANK; the
group is initialised from them (`env://`), with NCCL on GPUs and Gloo on CPU. Without those
variables everything runs as a single process and the collectives are no-ops.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank, how many there are, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group torchrun describes (if any) and pick this process's device.

    `device`: "cpu", "cuda" or None (CUDA when available). Each process uses cuda:LOCAL_RANK.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for, but torch sees no CUDA device")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        # a generous timeout: rank 0 evaluates and writes checkpoints while the others wait
        dist.init_process_group(backend=backend, init_method="env://", timeout=datetime.timedelta(minutes=30))
        _logger.debug("rank %d/%d joined the %s group", rank, world_size, backend)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def all_reduce_sum(values: list[float] | torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a vector of numbers over all processes (float64, so counts and sums stay exact)."""
    return _all_reduce(values, info, dist.ReduceOp.SUM)


def all_reduce_max(values: list[float] | torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The element-wise maximum of a vector of numbers over all processes (float64): flags that any
    process raised, or (negated) the smallest of the processes' values."""
    return _all_reduce(values, info, dist.ReduceOp.MAX)


def _all_reduce(values: list[float] | torch.Tensor, info: DistInfo, op: dist.ReduceOp) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float64)
    if info.distributed:
        # NCCL reduces device tensors only; Gloo reduces CPU tensors
        t = t.to(info.device) if info.device.type == "cuda" else t
        dist.all_reduce(t, op=op)
    return t.cpu()


def any_process(flag: bool, info: DistInfo) -> bool:
    """True when `flag` is true on any process (every process gets the same answer)."""
    return bool(all_reduce_sum([float(flag)], info)[0] > 0)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        if info.device.type == "cuda":
            dist.barrier(device_ids=[info.local_rank])
        else:
            dist.barrier()


def average_buffers(module: torch.nn.Module, info: DistInfo) -> None:
    """Average floating-point buffers (BatchNorm statistics) over processes, in place."""
    if not info.distributed:
        return
    for buf in module.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(info.world_size)


def cleanup(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: str | None = None) -> Iterator[DistInfo]:
    """`init_distributed` for a block, leaving the group again however the block ends."""
    info = init_distributed(device)
    try:
        yield info
    finally:
        cleanup(info)

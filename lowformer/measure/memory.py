"""Will a forward pass fit in memory? Asked before running, because on Linux a huge CPU allocation
is often granted (overcommitted) and the process is then killed by the OOM killer, with no
exception to catch and no message.

`forward_peak_bytes` runs the model once on the meta device (shapes only, nothing allocated, well
under a second) and records the peak of the bytes held by live tensors; `available_bytes` reads
what the device can still give (CUDA: free memory; CPU: MemAvailable, capped by a cgroup limit).
On CPU the estimate matched the measured peak of the tensors exactly for LowFormer-B1 at
3072x3072 (2.73 GiB), and the process's resident memory grew by 1.15x that (allocator and kernel
scratch space), so `check_forward_fits` asks for 1.15x.

NOTE: on the meta device `scaled_dot_product_attention` takes its math path, which materialises
the attention matrix; where the real device runs a fused kernel (EdgeViT on CPU) the estimate is
high by up to that matrix (about 2x for EdgeViT-XS at 1024x1024).
"""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..errors import OutOfMemory

__all__ = ["available_bytes", "check_forward_fits", "forward_peak_bytes", "meta_copy", "tensor_bytes"]

OVERHEAD = 1.15  # resident memory / peak tensor bytes, measured on CPU (module docstring)


class _LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of the storages that the tensors produced so far keep alive, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.live = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.live -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata  # views share their base's storage: counted once
                if key not in self.refs:
                    self.refs[key] = 0
                    self.sizes[key] = storage.nbytes()
                    self.live += self.sizes[key]
                    self.peak = max(self.peak, self.live)
                self.refs[key] += 1
                weakref.finalize(t, self._release, key)
        return out


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters and buffers live on the meta device (nothing is copied)."""
    memo: dict[int, torch.Tensor] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


@torch.no_grad()
def forward_peak_bytes(model: nn.Module, input_shape: Sequence[int], dtype: torch.dtype = torch.float32) -> int | None:
    """The peak bytes of the tensors one inference forward of `model` holds at once, the input
    included, from a shape-only run on the meta device. None when the model cannot run on the meta
    device (an operator without a meta kernel).

    Raises:
        ValueError: the model does not run on an input of this shape (the shape-only run says why).
    """
    meta = meta_copy(model).eval()
    counter = _LiveTensorBytes()
    try:
        with counter:
            x = torch.zeros(*input_shape, dtype=dtype, device="meta")
            meta(x)
    except NotImplementedError:
        return None
    except (RuntimeError, AssertionError, ValueError, TypeError, IndexError) as e:
        if "meta" in str(e).lower():
            return None
        label = getattr(model, "variant", type(model).__name__)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        shape = "x".join(map(str, input_shape))
        raise ValueError(f"{label} does not run on a {shape} input: {first}") from e
    return counter.peak


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Memory the device can still give: CUDA free memory; on CPU MemAvailable from /proc/meminfo,
    capped by the cgroup's limit less its usage. None where neither is known."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    found = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    return min(found) if found else None


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available() -> int | None:
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),  # v1
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 1 << 60:  # no limit
            return None
        return max(int(limit) - usage, 0)
    return None


def check_forward_fits(
    model: nn.Module,
    input_shape: Sequence[int],
    what: str,
    hint: str,
    reserve_bytes: int = 0,
    device: torch.device | str | None = None,
) -> int | None:
    """Raise `OutOfMemory` ("WHAT needs ~N GiB of memory, the CPU has M GiB available; HINT") when a
    forward pass at `input_shape`, plus `reserve_bytes`, would not fit in what the device has
    available. Returns the estimate in bytes (None when it cannot be made: then nothing is checked).

    Raises:
        ValueError: the model does not run at this shape (see `forward_peak_bytes`).
    """
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    peak = forward_peak_bytes(model, input_shape)
    if peak is None:
        return None
    needed = math.ceil(peak * OVERHEAD) + reserve_bytes
    available = available_bytes(device)
    if available is not None and needed > available:
        where = "the GPU" if torch.device(device).type == "cuda" else "this machine"
        raise OutOfMemory.needs(what, needed, available, where, hint)
    return needed


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of `model`'s parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))

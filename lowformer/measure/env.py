"""The machine a measurement runs on: device choice, the environment record, the TF32, cudnn.benchmark
and thread switches, peak memory and known peak throughput (for MFU)."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
from contextlib import contextmanager

import torch

MIB = 2**20

# Dense (no structured sparsity) peak TFLOP/s from NVIDIA's datasheets, per precision. "fp32" is
# the CUDA-core rate (TF32 off); "tf32", "fp16" and "bf16" are tensor-core rates. Matched in order
# against the device name, so the specific names come before the general ones.
PEAK_TFLOPS: list[tuple[str, str, dict[str, float]]] = [
    (r"H200", "H200", {"fp32": 67.0, "tf32": 494.7, "fp16": 989.4, "bf16": 989.4}),
    (r"H100.*PCIe", "H100 PCIe", {"fp32": 51.0, "tf32": 378.0, "fp16": 756.0, "bf16": 756.0}),
    (r"H100.*NVL", "H100 NVL", {"fp32": 60.0, "tf32": 417.5, "fp16": 835.5, "bf16": 835.5}),
    (r"H100", "H100 SXM", {"fp32": 67.0, "tf32": 494.7, "fp16": 989.4, "bf16": 989.4}),
    (r"A100", "A100", {"fp32": 19.5, "tf32": 156.0, "fp16": 312.0, "bf16": 312.0}),
    (r"L40S", "L40S", {"fp32": 91.6, "tf32": 183.0, "fp16": 362.1, "bf16": 362.1}),
    (r"A10\b", "A10", {"fp32": 31.2, "tf32": 62.5, "fp16": 125.0, "bf16": 125.0}),
    (r"L4\b", "L4", {"fp32": 30.3, "tf32": 60.0, "fp16": 121.0, "bf16": 121.0}),
    (r"T4\b", "T4", {"fp32": 8.1, "fp16": 65.0}),
    (r"V100", "V100", {"fp32": 15.7, "fp16": 125.0}),
]


def resolve_device(device: str | None = "auto") -> str:
    """ "auto" (or None) -> "cuda" when a GPU is visible, else "cpu"; checks that CUDA exists when asked."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu"
    if re.fullmatch(r"cuda(:\d+)?", device):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine (use cpu or auto)")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return device
    raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else cpu_name()


_CACHE_SIZE = re.compile(r"^\s*(\d+)\s*([KMG]?)", re.IGNORECASE)


def _cache_size(text: str) -> int:
    """Bytes of a sysfs cache size ("1024K", "32M"); 0 when it cannot be read."""
    m = _CACHE_SIZE.match(text)
    return int(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2).upper()] if m else 0


def _read_text(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity where the system reports one, else all)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def private_cache_bytes(device: str, threads: int | None, sysfs: str = "/sys/devices/system/cpu") -> int:
    """The caches private to a run's threads: on a GPU its L2; on a CPU the level-2 caches of the first
    `threads` CPUs the process may run on (each cache once when CPUs share one), as Linux reports
    them. 0 where that is not known (other systems)."""
    if str(device).startswith("cuda"):
        return int(getattr(torch.cuda.get_device_properties(torch.device(device)), "L2_cache_size", 0) or 0)
    cpus = usable_cpus()
    caches: dict[str, int] = {}
    for cpu in cpus[: max(1, threads or len(cpus))]:
        folder = os.path.join(sysfs, f"cpu{cpu}", "cache")
        try:
            indexes = sorted(os.listdir(folder))
        except OSError:
            return 0
        for index in indexes:
            path = os.path.join(folder, index)
            try:
                level, kind, size, shared = (
                    _read_text(os.path.join(path, name)) for name in ("level", "type", "size", "shared_cpu_list")
                )
            except OSError:
                continue
            if level == "2" and kind in ("Unified", "Data"):
                caches[shared] = _cache_size(size)
    return sum(caches.values())


def peak_tflops(name: str, precision: str) -> tuple[float | None, str | None]:
    """(peak TFLOP/s, which table row) for a device name and precision; (None, None) if unknown."""
    for pattern, label, peaks in PEAK_TFLOPS:
        if re.search(pattern, name):
            peak = peaks.get(precision)
            return (peak, f"table:{label}") if peak is not None else (None, None)
    return None, None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _gpu_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def _command() -> str:
    argv = list(sys.argv)
    if argv and os.path.basename(argv[0]) == "__main__.py":  # python -m lowformer
        argv[0] = "python -m lowformer"
    elif argv:
        argv[0] = os.path.basename(argv[0])
    return " ".join([*argv[:1], shlex.join(argv[1:])]).strip()


def tf32_state() -> dict[str, bool | str]:
    """Whether matmuls and cuDNN convolutions may use TF32 right now."""
    try:
        return {"tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32}
    except RuntimeError:  # the process mixed the legacy and the new TF32 API; read the new one
        return {
            "tf32_matmul": torch.backends.cuda.matmul.fp32_precision == "tf32",
            "tf32_cudnn": torch.backends.cudnn.conv.fp32_precision == "tf32",
        }


@contextmanager
def tf32_mode(enabled: bool):
    """Allow or forbid TF32 for matmuls and cuDNN convolutions inside the block, then restore."""
    before = tf32_state()
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before["tf32_matmul"]
        torch.backends.cudnn.allow_tf32 = before["tf32_cudnn"]


@contextmanager
def cudnn_benchmark_mode(enabled: bool):
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


@contextmanager
def num_threads(threads: int | None):
    """Use `threads` intra-op threads inside the block (None: leave torch's choice)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_GLIBC_DEFAULT_THRESHOLD = 128 * 1024  # both thresholds' documented defaults
_GLIBC_DEFAULT_MMAP_MAX = 65536


def _libc():
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


_memory_kept = False


def memory_mode() -> str:
    """ "keep" inside `keep_freed_memory`, else "default" (what the environment record calls the allocator)."""
    return "keep" if _memory_kept else "default"


@contextmanager
def keep_freed_memory(enabled: bool = True):
    """Keep freed memory in the process while the block runs, as caching allocators (jemalloc,
    tcmalloc) do, so that a timed call does not pay page faults for memory freed by the call before.

    NOTE: glibc's malloc, PyTorch's allocator on CPU, serves large blocks with mmap and gives freed
    heap memory back to the OS above a threshold it adjusts itself; the next call then touches
    fresh pages, and every page is a fault (microseconds each in a virtual machine). How much of a
    call that costs depends on what ran before in the process (a 3x3 depthwise conv measured 0.17 ms
    in one process and 1.4 ms in a fresh one), which makes CPU timings of large activations
    unrepeatable. This turns mmap off and the trim threshold up (`mallopt`), so nothing is returned,
    and sets glibc's defaults back after (which also ends glibc's own adjustment of the thresholds).
    A no-op where the C library has no `mallopt` (then `memory_mode()` stays "default").
    """
    global _memory_kept
    libc = _libc() if enabled else None
    if libc is None or _memory_kept:
        yield
        return
    if not (libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)):
        yield
        return
    _memory_kept = True
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, _GLIBC_DEFAULT_MMAP_MAX)
        libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD)
        _memory_kept = False


# CPU timings are distorted (threads wait on each other) when the 1-minute load average before a run
# is above this share of the CPUs.
BUSY_LOAD_PER_CPU = 0.5


def is_busy(device: str, load_avg_1m: float | None, cpu_count: int | None) -> bool:
    """Whether other work on the machine distorts CPU timings on `device` (GPU timings are not affected)."""
    if str(device).startswith("cuda") or load_avg_1m is None or not cpu_count:
        return False
    return load_avg_1m > BUSY_LOAD_PER_CPU * cpu_count


def cpu_load() -> tuple[float | None, int]:
    """(1-minute load average, CPU count) of the machine now; the load is None where the OS has none."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return load, os.cpu_count() or 1


def _proc_status_kib(*keys: str) -> dict[str, int] | None:
    """The named fields of /proc/self/status in KiB, or None where it cannot be read."""
    try:
        with open("/proc/self/status") as f:
            found = {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in f) if k in keys}
    except (OSError, ValueError):
        return None
    return found if len(found) == len(keys) else None


class PeakMemory:
    """Peak memory of one configuration.

    CUDA: the caching allocator's `max_memory_allocated` (tensors only; no context, no workspace
    held outside the allocator). CPU: the process's peak resident set (`VmHWM` in
    /proc/self/status), reset before the configuration by writing 5 to /proc/self/clear_refs;
    where that reset is refused the value is the process lifetime peak, and where /proc is missing
    it is `ru_maxrss` (lifetime). `source` names which one was read.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self._reset_ok = False

    def reset(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            # a reset that took brings the peak down to what is resident now; some sandboxes accept the
            # write and ignore it, and then the value read later is the lifetime peak
            status = _proc_status_kib("VmHWM", "VmRSS")
            self._reset_ok = status is not None and status["VmHWM"] <= status["VmRSS"] + 4096
        except OSError:
            self._reset_ok = False

    def read(self) -> tuple[float | None, str]:
        if self.device.startswith("cuda"):
            return torch.cuda.max_memory_allocated(self.device) / MIB, "cuda_max_memory_allocated"
        status = _proc_status_kib("VmHWM")
        if status is not None:
            return status["VmHWM"] * 1024 / MIB, "proc_vmhwm" if self._reset_ok else "proc_vmhwm_lifetime"
        # ru_maxrss is in KiB on Linux, bytes on macOS
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return (rss if sys.platform == "darwin" else rss * 1024) / MIB, "ru_maxrss_lifetime"


def environment(device: str) -> dict:
    """Everything a reader needs to reproduce or judge a number; recorded once per run."""
    env: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": _command(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "lowformer": _version("lowformer"),
        "torch": torch.__version__,
        "timm": _version("timm"),
        "onnx": _version("onnx"),
        "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
        "numpy": _version("numpy"),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch_threads": torch.get_num_threads(),
        "memory": memory_mode(),  # "keep" when freed memory stays in the process (keep_freed_memory)
        "torch_interop_threads": torch.get_num_interop_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "device": device,
        "device_name": device_name(device),
        "cuda_available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda,  # the CUDA version torch was built with
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpu_driver": None,
        "gpu_memory_gib": None,
        "gpu_capability": None,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        **tf32_state(),
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        env["gpu_driver"] = _gpu_driver()
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 2)
        env["gpu_capability"] = f"{props.major}.{props.minor}"
    return env

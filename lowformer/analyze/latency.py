"""An analytic latency model: a model's time from its operators' FLOPs and bytes, the device's measured
ceilings, and per-kind efficiency factors fitted on single operators, never on whole models.

For one top-level operator call of kind k (`lowformer.analyze.opkinds.fit_kind`) with F FLOPs and B
bytes moved (`lowformer.measure.opcost`), on a device with compute ceiling C, bandwidth M and
per-call overhead O (`lowformer.measure.calibrate`):

    R = max(F / (e_c[k] * C), B / (e_m[k] * M(B)))
    t = s[k] * (R * S(R) + o[k] * O) + P(W)

and a model's predicted time is the sum over its calls. R is the call's roofline time and S(R) its
serial share on a CPU run with T > 1 threads: a call runs on all T threads when its work (R) is much
larger than the kind's half-parallel time h[k] and on one when it is much smaller (PyTorch splits
small work into fewer chunks than threads, and a kernel's set-up is serial), so

    S(R) = 1 + (T - 1) * h[k] / (R + h[k])

is 1 when the whole call runs in parallel and T when none of it does (h = 0, and on CUDA: always 1).
C and M are measured with all T threads, so S is the factor by which a call falls short of them
because it is small. (Sweep versions 4 and 5 measured a call's size by its output bytes W instead of
its roofline time, S(W) with h in bytes; their files predict so. The roofline time measures the work
that is split, whatever bounds it: seven version-5 sweeps refitted with it ranked the twenty stored
runs of 2026-12-01/02 at batch 1 0.890 on average, 0.875 by output bytes; batch 16 0.944 and 0.948.)

P(W) is what the call's output of W bytes costs in page faults: W / 4 KiB pages at the calibrated
cost of a fresh page when W is larger than 32 MiB (`Ceilings.fresh_pages_s`; glibc's malloc maps such
blocks anew on every allocation; 0 with freed memory kept or on CUDA). An approximation of the
largest part: on the development CPU at batch 16, the faults per call of the ten models with the
most were 1.0-1.8x these outputs' pages, those of others 0.3-3.4x, and smaller blocks fault too when
glibc trims its heap (benchmarks/page_faults.py).

A call whose inputs an earlier call left in cache runs faster than one that reads them from memory.
Every kind therefore has a second set of factors, fitted the same way on the sweep's *hot* calls (the
second call of each round, right after itself: inputs and weights in cache), and a call's time is

    t = t_first + r * (t_hot - t_first)

where t_first and t_hot are the formula above with the first-call and the hot-call factors, and r is the
share of the bytes it reads that are still in cache when it runs: a tensor counts as in cache when its
size plus the traffic of the calls since its last use (its reuse distance,
`lowformer.measure.opcost.reuse_distances`) fit in the caches private to the threads (`cache_bytes`:
the L2 of the cores the threads run on, a GPU's L2; `lowformer.measure.env.private_cache_bytes`). In a
network the input of most calls was written by the call before it, so at batch 1 r is near 1 for
elementwise calls and near the activations' share for a conv (its weights were last used a whole pass
ago); at batch 16 most tensors are larger than the cache and r is near 0. r * (t_hot - t_first) is
reported as the call's cache reuse (negative: time saved).

M(B) is the copy bandwidth the calibration measured at B bytes (`Ceilings.bandwidth_at`: caches make
small copies faster); e_c and e_m are the shares of the ceilings the kind reaches; o is its overhead
per call in units of O (a convolution's primitive set-up costs more than a tiny add's dispatch). s is
1 unless the model was refined on design-element sweeps (`lowformer.analyze.element_fit`): a kind's
scale inside whole blocks.

The factors are fitted per kind on an *operator micro-sweep*: every kind's typical operators (1x1 and
3x3 convs and window pools, also on channels-last inputs, depthwise convs of 1-7 px kernels (3x3 also on
channels-last and strided inputs), which run other kernels, linears on tokens, attention products, norms,
activations, elementwise ops, copies, views) built alone at a range of channels, resolutions
and batch sizes, timed with the measuring core interleaved with each other, and fitted in log space
(relative errors), so no model that the prediction is judged on ever informs it. Each round calls
every case twice in a row: the first call comes after all the other cases (its weights and
activations out of the caches, as a model's weights are between two of its uses), the second right
after itself (its code path and dispatch hot, as they are in a network that runs the same kinds of
operator again and again). The first-call factors (e_c, e_m, o and h) are fitted on the first calls and
the hot factors, all four, on the hot calls, so that t_first and t_hot each describe one kind of call and
r chooses between them: a batch norm at batch 1, whose input the call before it wrote, runs at its hot
time (its first call costs 3-5x that), a conv whose weights were last used a pass ago near its first.
h is chosen per kind from a grid of times by the same least squares, the other three fitted again under
it. (Sweep versions 2-9 took t_first's o from the hot calls too, a choice of version 2, made before r
existed; judged on the same stored runs, the first calls' o ranks the models better at batch 1:
docs/analyze.md, "The first call's overhead, now that reuse prices the hot calls".) The fit is cached
next to the calibration.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._io import write_json
from ..measure.calibrate import Ceilings, cache_key, cache_path, read_cached
from ..measure.env import private_cache_bytes, usable_cpus
from ..measure.memory import meta_copy
from ..measure.opcost import COST_CONVENTION, OpCost, call_cost, image_layout, inner_stride, op_costs
from ..measure.session import make_input, run_context
from ..measure.timing import Candidate, Rounds, TimingPolicy, device_timer, interleave
from .opkinds import FALLBACK_KINDS, fit_kind_of

_logger = logging.getLogger(__name__)

SCHEMA = "lowformer.analyze.latency-model/1"
SWEEP_VERSION = 10  # bump when the cases, their grid, their timing or the fit change
# versions whose files still load: 1 timed each case once per round, so its overhead is the first call's;
# 2 fitted without the fresh-page term (its samples carry no output bytes, so the term is 0 in its fit);
# 3 without the serial share (h = 0: every call runs on all threads); 4 without hot-call factors (no
# cache reuse: every call at its first-call time); 4 and 5 sized the serial share by output bytes, 5
# warmed each CPU case up with two calls, not one; 1-6 have no depthwise cases on channels-last or strided
# inputs (their files predict those calls with the NCHW depthwise conv's factors), 1-7 no SDPA case with a
# strided head dimension (theirs predict it with SDPA's), 1-8 no dense conv or window pool on channels-last
# inputs (theirs predict those with the NCHW kinds' factors), and 1-8 timed 5 rounds where 9 times 3;
# `FALLBACK_KINDS`; 2-9 fitted the first-call time's overhead on the hot calls (kept beside it as
# `first_call_overhead`, their files predict with the hot one), where 10 fits it on the first calls
READABLE_SWEEP_VERSIONS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
# the half-parallel times h tried per kind (roofline seconds; 0: always parallel): 1 us to 10 ms
SERIAL_HALVES = (0.0, *(10.0 ** (e / 4) for e in range(-24, -7)))

# the grid every case is built at: (channels, resolution), stage-like pairs and their neighbours
CELLS = (
    (16, 112),
    (32, 56),
    (64, 56),
    (64, 28),
    (128, 28),
    (128, 14),
    (256, 14),
    (256, 7),
    (512, 7),
    (32, 7),
    (256, 1),
)
QUICK_CELLS = ((16, 28), (64, 14), (128, 7))
HEAD_DIM = 32


class _Op(nn.Module):
    """One functional operator on the input, with any second operands held as buffers (so they are
    separate tensors, as in a network)."""

    def __init__(self, fn: Callable, *operands: torch.Tensor) -> None:
        super().__init__()
        self.fn = fn
        for i, t in enumerate(operands):
            self.register_buffer(f"operand{i}", t)
        self.count = len(operands)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, *(getattr(self, f"operand{i}") for i in range(self.count)))


Built = tuple[nn.Module, tuple[int, ...]]  # (module, input shape with batch)


@dataclass(frozen=True)
class OpCase:
    """One operator of the micro-sweep: `build(channels, resolution, batch)` gives the module and its
    input shape. The module runs exactly one top-level ATen call of kind `kind`, on an input laid out as
    `layout` says (`lowformer.measure.opcost.image_layout`)."""

    kind: str
    label: str
    build: Callable[[int, int, int], Built]
    layout: str = "nchw"  # of the input: "nchw", "channels_last", "strided" or "transposed" (`_laid_out`)


def _image(c: int, r: int, b: int) -> tuple[int, ...]:
    return (b, c, r, r)


def _heads(c: int) -> int:
    return max(1, c // HEAD_DIM)


def _conv(cin: Callable[[int], int], cout: Callable[[int], int], k: int, stride: int = 1, groups=None):
    """A conv C_in -> C_out at the cell; `groups`: None (dense), "depthwise" (groups = C_in) or a
    function of the channels."""

    def build(c: int, r: int, b: int) -> Built:
        i, o = cin(c), cout(c)
        g = 1 if groups is None else i if groups == "depthwise" else groups(c)
        conv = nn.Conv2d(i, o, k, stride, k // 2, groups=g)
        return conv, (b, i, r * stride, r * stride)

    return build


def _module(make: Callable[[int], nn.Module]):
    return lambda c, r, b: (make(c), _image(c, r, b))


def _tokens(make: Callable[[int], nn.Module]):
    return lambda c, r, b: (make(c), (b, r * r, c))


def _attention(fn: Callable, operands: Callable[[int, int, int], list], input_shape):
    def build(c: int, r: int, b: int) -> Built:
        tensors = [o if isinstance(o, torch.Tensor) else torch.randn(o) for o in operands(c, r, b)]
        return _Op(fn, *tensors), input_shape(c, r, b)

    return build


def _qkv(c: int, r: int, b: int) -> tuple[int, ...]:
    return (b, _heads(c), r * r, HEAD_DIM)


def _qkv_strided(c: int, r: int, b: int) -> torch.Tensor:
    """A key or value with a strided head dimension (`_laid_out`'s "transposed")."""
    return _laid_out(torch.randn(_qkv(c, r, b)), "transposed")


def _keys_t(c: int, r: int, b: int) -> torch.Tensor:
    """Keys transposed as attention uses them: a (batch, heads, head_dim, tokens) view."""
    return torch.randn(_qkv(c, r, b)).transpose(-2, -1)


def _scores(c: int, r: int, b: int) -> tuple[int, ...]:
    return (b, _heads(c), r * r, r * r)


def _with_operand(fn: Callable, operand_shape: Callable[[int, int, int], tuple[int, ...]]):
    def build(c: int, r: int, b: int) -> Built:
        return _Op(fn, torch.randn(operand_shape(c, r, b))), _image(c, r, b)

    return build


def _fn(fn: Callable):
    return lambda c, r, b: (_Op(fn), _image(c, r, b))


CASES: tuple[OpCase, ...] = (
    OpCase("conv_1x1", "1x1 C->C", _conv(lambda c: c, lambda c: c, 1)),
    OpCase("conv_1x1", "1x1 C->4C", _conv(lambda c: c, lambda c: 4 * c, 1)),
    OpCase("conv_1x1", "1x1 4C->C", _conv(lambda c: 4 * c, lambda c: c, 1)),
    OpCase(
        "conv_1x1_channels_last",
        "1x1 C->4C, channels-last input",
        _conv(lambda c: c, lambda c: 4 * c, 1),
        layout="channels_last",
    ),
    OpCase(
        "conv_1x1_channels_last",
        "1x1 4C->C, channels-last input",
        _conv(lambda c: 4 * c, lambda c: c, 1),
        layout="channels_last",
    ),
    OpCase("conv_kxk", "3x3 C->C", _conv(lambda c: c, lambda c: c, 3)),
    OpCase(
        "conv_kxk_channels_last",
        "3x3 C->C, channels-last input",
        _conv(lambda c: c, lambda c: c, 3),
        layout="channels_last",
    ),
    OpCase("conv_kxk", "3x3 s2 C->2C", _conv(lambda c: c, lambda c: 2 * c, 3, stride=2)),
    OpCase("conv_kxk", "3x3 s2 3->C (stem)", _conv(lambda c: 3, lambda c: c, 3, stride=2)),
    OpCase("grouped_conv", "3x3 groups C/16", _conv(lambda c: c, lambda c: c, 3, groups=lambda c: max(1, c // 16))),
    OpCase("depthwise_conv", "dw 3x3", _conv(lambda c: c, lambda c: c, 3, groups="depthwise")),
    OpCase(
        "depthwise_conv_channels_last",
        "dw 3x3, channels-last input",
        _conv(lambda c: c, lambda c: c, 3, groups="depthwise"),
        layout="channels_last",
    ),
    OpCase(
        "depthwise_conv_strided",
        "dw 3x3, strided input (tokens as an image)",
        _conv(lambda c: c, lambda c: c, 3, groups="depthwise"),
        layout="strided",
    ),
    OpCase("depthwise_conv_large", "dw 5x5", _conv(lambda c: c, lambda c: c, 5, groups="depthwise")),
    OpCase("depthwise_conv_large", "dw 7x7", _conv(lambda c: c, lambda c: c, 7, groups="depthwise")),
    OpCase("depthwise_conv", "dw 3x3 s2", _conv(lambda c: c, lambda c: c, 3, stride=2, groups="depthwise")),
    OpCase("depthwise_multiplier", "dw 7x7 C->2C", _conv(lambda c: c, lambda c: 2 * c, 7, groups="depthwise")),
    OpCase("depthwise_multiplier", "dw 3x3 C->2C", _conv(lambda c: c, lambda c: 2 * c, 3, groups="depthwise")),
    OpCase("depthwise_conv_1x1", "dw 1x1 (channel scale)", _conv(lambda c: c, lambda c: c, 1, groups="depthwise")),
    OpCase("transposed_conv", "convT 2x2 s2", _module(lambda c: nn.ConvTranspose2d(c, c, 2, 2))),
    OpCase("transposed_conv", "convT 4x4 s2", _module(lambda c: nn.ConvTranspose2d(c, c, 4, 2, 1))),
    OpCase("linear", "linear C->C", _tokens(lambda c: nn.Linear(c, c))),
    OpCase("linear", "linear C->4C", _tokens(lambda c: nn.Linear(c, 4 * c))),
    OpCase("matmul", "q @ k^T", _attention(torch.matmul, lambda c, r, b: [_keys_t(c, r, b)], _qkv)),
    OpCase("matmul", "attn @ v", _attention(lambda a, v: a @ v, lambda c, r, b: [_qkv(c, r, b)], _scores)),
    OpCase(
        "sdpa",
        "SDPA",
        _attention(F.scaled_dot_product_attention, lambda c, r, b: [_qkv(c, r, b), _qkv(c, r, b)], _qkv),
    ),
    OpCase(
        "sdpa_strided",
        "SDPA, strided head dimension",
        _attention(
            F.scaled_dot_product_attention, lambda c, r, b: [_qkv_strided(c, r, b), _qkv_strided(c, r, b)], _qkv
        ),
        layout="transposed",
    ),
    OpCase("softmax", "softmax", _attention(lambda a: a.softmax(-1), lambda c, r, b: [], _scores)),
    OpCase("batch_norm", "BatchNorm", _module(lambda c: nn.BatchNorm2d(c).eval())),
    OpCase("group_norm", "GroupNorm(1)", _module(lambda c: nn.GroupNorm(1, c))),
    OpCase("layer_norm", "LayerNorm (tokens)", _tokens(lambda c: nn.LayerNorm(c))),
    OpCase("activation", "ReLU", _module(lambda c: nn.ReLU())),
    OpCase("activation", "Hardswish", _module(lambda c: nn.Hardswish())),
    OpCase("activation_exp", "GELU", _module(lambda c: nn.GELU())),
    OpCase("activation_exp", "SiLU", _module(lambda c: nn.SiLU())),
    OpCase("activation_exp", "Sigmoid", _module(lambda c: nn.Sigmoid())),
    OpCase("elementwise", "add", _with_operand(torch.add, _image)),
    OpCase("elementwise", "mul (channel scale)", _with_operand(torch.mul, lambda c, r, b: (b, c, 1, 1))),
    OpCase("reduce", "mean over HxW", _fn(lambda x: x.mean((2, 3), keepdim=True))),
    OpCase("reduce", "adaptive avg pool 1", _fn(lambda x: F.adaptive_avg_pool2d(x, 1))),
    OpCase("pool", "max pool 3x3 s2", _fn(lambda x: F.max_pool2d(x, 3, 2, 1))),
    OpCase("pool", "avg pool 3x3", _fn(lambda x: F.avg_pool2d(x, 3, 1, 1))),
    OpCase(
        "pool_channels_last",
        "max pool 3x3 s2, channels-last input",
        _fn(lambda x: F.max_pool2d(x, 3, 2, 1)),
        layout="channels_last",
    ),
    OpCase(
        "pool_channels_last",
        "avg pool 3x3, channels-last input",
        _fn(lambda x: F.avg_pool2d(x, 3, 1, 1)),
        layout="channels_last",
    ),
    OpCase("resample", "bilinear x2", _fn(lambda x: F.interpolate(x, scale_factor=2.0, mode="bilinear"))),
    OpCase("concat", "cat", _with_operand(lambda x, y: torch.cat([x, y], 1), _image)),
    OpCase("copy", "pad", _fn(lambda x: F.pad(x, (1, 1, 1, 1)))),
    OpCase("copy", "to channels_last", _fn(lambda x: x.contiguous(memory_format=torch.channels_last))),
    OpCase("view", "flatten", _fn(lambda x: x.flatten(2))),
    OpCase("view", "transpose", _fn(lambda x: x.transpose(1, 2))),
    OpCase("view", "dropout (eval)", _fn(lambda x: F.dropout(x, 0.1, training=False))),
)


@dataclass(frozen=True)
class SweepLimits:
    """Cells a case is not built at: more FLOPs or bytes per call than these (a CPU would take seconds)."""

    max_flops: float = 4e9
    max_bytes: float = 256e6


def default_limits(device: str) -> SweepLimits:
    return SweepLimits(4e11, 8e9) if str(device).startswith("cuda") else SweepLimits()


def sweep_rounds(device: str) -> Rounds:
    """How the cases of one cell are timed: a short warm-up each, then rounds in which every case runs
    twice in a row, interleaved with the others (see `run_op_sweep`)."""
    cuda = str(device).startswith("cuda")
    # on CPU one warm-up call builds what a call keeps (its oneDNN primitive, its allocations); the
    # call after it, timed as the estimate, is a second
    warmup = TimingPolicy(warmup_iters=5 if cuda else 1, warmup_s=0.0, min_iters=1, min_s=0.0)
    burst = TimingPolicy(warmup_iters=0, warmup_s=0.0, min_iters=2, min_s=0.0, max_iters=2)
    return Rounds(3, burst=burst, warmup=warmup)


@dataclass
class Sample:
    """One operator case at one cell and batch size: its cost and its measured time per call."""

    kind: str
    label: str
    channels: int
    resolution: int
    batch_size: int
    flops: int
    bytes: int
    time_s: float  # the first call of each round: after the other cases (median over rounds)
    hot_time_s: float | None = None  # the second: right after itself
    bytes_written: int = 0  # of the output (its fresh pages are a fixed term of the fit)

    def to_dict(self) -> dict:
        return asdict(self)


def _laid_out(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The image `x` laid out as `layout` says (`lowformer.measure.opcost.image_layout`): "strided" is a
    sequence of H*W tokens of B x C values viewed as a B x C x H x W image (memory order H, W, B, C); at
    batch 1 that is what a (1, H*W, C) token sequence viewed as an image is, which a network hands its
    depthwise convs at batch 1 (at larger batches, (B, H*W, C) tokens viewed so are channels-last).
    "transposed" (any tensor) swaps the order of its last two dimensions in memory, as a query of attention
    that is a (B, heads, head_dim, tokens) tensor transposed has it (`lowformer.measure.opcost.inner_stride`)."""
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        return x.permute(2, 3, 0, 1).contiguous().permute(2, 3, 0, 1)
    if layout == "transposed":
        return x.transpose(-2, -1).contiguous().transpose(-2, -1)
    return x


def _has_layout(x: torch.Tensor, layout: str) -> bool:
    """Whether `x` has what `_laid_out` made of it: one pixel is NCHW and channels-last at once, and a
    transposed single token (or a head dimension of 1) is contiguous."""
    if layout == "transposed":
        return inner_stride(x) != 1
    return x.dim() != 4 or image_layout(x) == layout


def _case_cost(module: nn.Module, shape: tuple[int, ...], layout: str = "nchw") -> OpCost | None:
    """The one top-level call of a case, counted on the meta device; None when the case has nothing
    to do at this shape (a layout change of a tensor that already has it, an input that cannot have
    the case's layout at this shape: one pixel is NCHW and channels-last at once). Counted without the
    profiler (`call_cost`; the tests check that every case runs one top-level call); a case whose call
    reaches no ATen operator is asked the profiler whether it runs one."""
    module = meta_copy(module)
    x = _laid_out(torch.zeros(shape, device="meta"), layout)
    if not _has_layout(x, layout):
        return None
    cost = call_cost(module, x)
    if cost is None:
        costs = op_costs(module, x)
        if len(costs) > 1:
            raise RuntimeError(f"an operator case must run one top-level call, got {[c.name for c in costs]}")
        cost = costs[0] if costs else None
    return cost


def run_op_sweep(
    device: str = "cpu",
    *,
    threads: int | None = None,
    clock: str = "wall",
    precision: str = "fp32",
    batch_sizes: Sequence[int] = (1, 16),
    cells: Sequence[tuple[int, int]] = CELLS,
    cases: Sequence[OpCase] = CASES,
    limits: SweepLimits | None = None,
    rounds: Rounds | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Sample]:
    """Build and time every case at every cell and batch size (within `limits`); one `Sample` each.

    The cases of one cell and batch size are timed together, interleaved round by round, each called
    twice per round. The first call runs after all the other cases, as an operator runs in a
    network after others that used the caches and the allocator (timed alone in a loop, an operator
    finds its weights hot and runs up to twice as fast as inside a model at batch 1); the second runs
    right after itself, with its code path and dispatch hot, as a network's many calls of each kind
    keep them. `time_s` is the median of the first calls, `hot_time_s` of the second.
    """
    limits = limits or default_limits(device)
    rounds = rounds or sweep_rounds(device)
    groups = [(c, r, b) for b in batch_sizes for c, r in cells]
    samples = []
    with run_context(device, precision, threads):
        timer = device_timer(device, clock)
        for i, (c, r, b) in enumerate(groups):
            if progress is not None:
                progress(i, len(groups))
            ready = []
            inputs = {}  # one random input per shape, copied for each case (drawing it is slower than copying)
            for case in cases:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(0)
                    module, shape = case.build(c, r, b)
                cost = _case_cost(module, shape, case.layout)  # on a copy: the module is not touched
                if cost is None or cost.flops > limits.max_flops or cost.bytes > limits.max_bytes:
                    continue
                module = module.to(device).eval()
                if shape not in inputs:
                    inputs[shape] = make_input(shape, device)
                x = _laid_out(inputs[shape].clone(), case.layout)
                ready.append((case, cost, Candidate(case.label, functools.partial(module, x), timer)))
            times = interleave([candidate for _, _, candidate in ready], rounds)
            for (case, cost, _), t in zip(ready, times):
                first = statistics.median(burst[0] for burst in t.rounds)
                second = statistics.median(burst[-1] for burst in t.rounds)
                samples.append(
                    Sample(case.kind, case.label, c, r, b, cost.flops, cost.bytes, first, second, cost.bytes_written)
                )
        if progress is not None:
            progress(len(groups), len(groups))
    return samples


# --------------------------------------------------------------------------------------------
# The fit
# --------------------------------------------------------------------------------------------


@dataclass
class KindFactors:
    """The fitted factors of one kind (see the module's docstring) and how well they fit."""

    compute_efficiency: float  # e_c: share of the compute ceiling
    memory_efficiency: float  # e_m: share of the bandwidth ceiling
    overhead_calls: float  # o: overhead per call in units of the calibrated overhead (sweep versions 2-9: hot calls)
    samples: int = 0
    median_abs_error: float | None = None  # of the fit on its own first calls (e_c, e_m and their own o)
    element_scale: float = 1.0  # s: fitted on design-element sweeps (`lowformer.analyze.element_fit`)
    first_call_overhead: float | None = None  # sweep versions 2-9: o fitted on the first calls; unused
    half_parallel_s: float = 0.0  # h: the roofline time at which half of a call's work runs in parallel
    half_parallel_bytes: float = 0.0  # h of sweep versions 4 and 5: the output size (bytes) instead
    hot: KindFactors | None = None  # e_c, e_m, o and h fitted on the hot calls (inputs and weights in cache)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> KindFactors:
        hot = d.get("hot")
        return cls(**{**d, "hot": cls.from_dict(hot) if hot else None})


DEFAULT_FACTORS = KindFactors(1.0, 1.0, 1.0)

# a weak pull of log(e_c), log(e_m) towards 0 (the ceilings), so that a factor the samples cannot
# tell (the compute share of an operator that is always memory-bound) stays at the ceiling
_PRIOR = 1e-3


def _bandwidths(nbytes, ceilings: Ceilings) -> np.ndarray:
    return np.array([ceilings.bandwidth_at(float(n)) for n in np.atleast_1d(nbytes)])


def _fresh_pages(written, ceilings: Ceilings) -> np.ndarray:
    return np.array([ceilings.fresh_pages_s(float(n)) for n in np.atleast_1d(written)])


def serial_share(size, half: float, threads: int | None):
    """S of the module's docstring: 1 + (T - 1) h / (size + h), the size (a roofline time, or the output
    bytes of sweep versions 4 and 5) in h's unit; 1 with h = 0 or one thread (or CUDA)."""
    size = np.asarray(size, dtype=float)
    if not half or not threads or threads < 2:
        return np.ones_like(size)
    return 1.0 + (threads - 1) * half / (size + half)


def _predict_s(flops, nbytes, f: KindFactors, ceilings: Ceilings, written=0):
    compute = flops / (f.compute_efficiency * ceilings.flops_per_s)
    memory = nbytes / (f.memory_efficiency * _bandwidths(nbytes, ceilings))
    roof = np.maximum(compute, memory)
    serial = serial_share(roof, f.half_parallel_s, ceilings.threads)
    return roof * serial + f.overhead_calls * ceilings.overhead_s + _fresh_pages(written, ceilings)


def _fit_grid(
    flops: np.ndarray,
    nbytes: np.ndarray,
    times: np.ndarray,
    ceilings: Ceilings,
    fixed: np.ndarray | float = 0.0,
    half: float = 0.0,
    levels: int = 4,
    coarse: bool = False,
) -> tuple[float, ...]:
    """(e_c, e_m, o, loss) by least squares in log time over a grid, refined `levels - 1` times around
    the best point; `fixed` (seconds per sample, the fresh pages) is added to every prediction, and
    the roofline time R at each grid point is multiplied by its serial share with the half-parallel
    time `half` (`serial_share`), neither fitted. `coarse` starts from every other grid point (an
    eighth of the work). The grid is evaluated in float32: 6.6x faster than float64 on the development
    CPU, and on three stored sweeps the factors moved by at most 0.4% (one refinement step)."""
    f32 = np.float32
    log_t = np.log(times).astype(f32)
    # the per-sample terms in seconds at unit factors, so that the grid's products stay in float32's range
    compute_s = (np.asarray(flops, dtype=float) / ceilings.flops_per_s).astype(f32)
    memory_s = (np.asarray(nbytes, dtype=float) / _bandwidths(nbytes, ceilings)).astype(f32)
    fixed = np.asarray(fixed, dtype=f32)
    parallel = half and ceilings.threads and ceilings.threads > 1
    lc, lm = np.linspace(-3.5, 0.5, 41), np.linspace(-2.5, 2.0, 46)
    lo = np.linspace(-1.0, 3.5, 46)  # log10 of o; o = 0 is tried too
    if coarse:
        lc, lm, lo = lc[::2], lm[::2], lo[::2]
    best = None
    for _ in range(levels):
        c = (10.0 ** lc[:, None, None, None]).astype(f32)
        m = (10.0 ** lm[None, :, None, None]).astype(f32)
        o = np.concatenate([[0.0], 10.0**lo])[None, None, :, None].astype(f32)
        roof = np.maximum(compute_s / c, memory_s / m)
        if parallel:
            roof = roof * (1 + (ceilings.threads - 1) * f32(half) / (roof + f32(half)))
        pred = roof + o * f32(ceilings.overhead_s) + fixed
        loss = ((np.log(np.maximum(pred, f32(1e-12))) - log_t) ** 2).mean(-1, dtype=f32)
        loss = loss + _PRIOR * (np.log(c[..., 0]) ** 2 + np.log(m[..., 0]) ** 2)
        i, j, k = np.unravel_index(np.argmin(loss), loss.shape)
        best = (10.0 ** lc[i], 10.0 ** lm[j], 0.0 if k == 0 else 10.0 ** lo[k - 1], float(loss[i, j, k]))
        # refine: a finer grid around the best point
        step_c, step_m, step_o = (lc[1] - lc[0]), (lm[1] - lm[0]), (lo[1] - lo[0])
        lc = np.linspace(lc[i] - 2 * step_c, lc[i] + 2 * step_c, 21)
        lm = np.linspace(lm[j] - 2 * step_m, lm[j] + 2 * step_m, 21)
        centre = lo[max(k - 1, 0)] if k else lo[0] - 2 * step_o
        lo = np.linspace(centre - 2 * step_o, centre + 2 * step_o, 21)
    return tuple(float(v) for v in best)


def _fit_times(
    flops: np.ndarray, nbytes: np.ndarray, written: np.ndarray, times: np.ndarray, ceilings: Ceilings, serial: bool
) -> KindFactors:
    """e_c, e_m, o and h fitted on one set of times (see `fit_kind_factors`), with its median error."""
    pages = _fresh_pages(written, ceilings)
    half = 0.0
    if serial and ceilings.threads and ceilings.threads > 1:
        losses = {
            h: _fit_grid(flops, nbytes, times, ceilings, pages, h, levels=2, coarse=True)[3] for h in SERIAL_HALVES
        }
        half = min(losses, key=losses.get)
    compute, memory, o, _ = _fit_grid(flops, nbytes, times, ceilings, pages, half)
    factors = KindFactors(compute, memory, o, samples=len(times), half_parallel_s=half)
    errors = np.abs(_predict_s(flops, nbytes, factors, ceilings, written) / times - 1)
    factors.median_abs_error = float(np.median(errors))
    return factors


def fit_kind_factors(samples: Sequence[Sample], ceilings: Ceilings, serial: bool = True) -> KindFactors:
    """e_c, e_m, o and h fitted on the samples' first calls, and where every sample has a hot call, the
    hot factors, all four, on the hot calls alone. Each fit is least squares in log time over (e_c,
    e_m, o). With more than one CPU thread, h is the time of `SERIAL_HALVES` whose coarse fit (every
    other grid point, refined once) fits the times best; the fit then runs under its serial share.
    `serial=False` fits h = 0 (every call on all threads: the model of sweep version 3)."""
    flops = np.array([s.flops for s in samples], dtype=float)
    nbytes = np.array([s.bytes for s in samples], dtype=float)
    written = np.array([s.bytes_written for s in samples], dtype=float)
    factors = _fit_times(flops, nbytes, written, np.array([s.time_s for s in samples], dtype=float), ceilings, serial)
    if all(s.hot_time_s for s in samples):
        hot = np.array([s.hot_time_s for s in samples], dtype=float)
        factors.hot = _fit_times(flops, nbytes, written, hot, ceilings, serial)
    return factors


@dataclass
class LatencyModel:
    """Ceilings and per-kind factors: everything a prediction needs (see the module's docstring)."""

    ceilings: Ceilings
    factors: dict[str, KindFactors]
    settings: dict = field(default_factory=dict)  # how the sweep ran: batch sizes, cells, timing, clock
    samples: list[Sample] = field(default_factory=list)
    sweep_version: int = SWEEP_VERSION  # of the sweep that the factors were fitted on
    cache_bytes: int = 0  # the caches private to the threads; 0: no cache reuse (every call at its first-call time)

    def factors_of(self, kind: str) -> KindFactors:
        """A kind's factors; a kind split off another after the sweep that fitted these
        (`FALLBACK_KINDS`) has that one's, any other kind without samples the elementwise ones."""
        return (
            self.factors.get(kind)
            or self.factors.get(FALLBACK_KINDS.get(kind, ""))
            or self.factors.get("elementwise")
            or DEFAULT_FACTORS
        )

    def op_time_s(
        self, kind: str, flops: float, nbytes: float, factors: KindFactors | None = None
    ) -> tuple[float, float, float]:
        """(compute, memory, overhead) seconds of one call at this kind's factors (or `factors`, its
        hot ones), times its element scale; compute and memory at all the calibration's threads (see
        `serial_factor`)."""
        f = self.factors_of(kind)
        scale = f.element_scale
        f = factors or f
        c = self.ceilings
        return (
            scale * flops / (f.compute_efficiency * c.flops_per_s),
            scale * nbytes / (f.memory_efficiency * c.bandwidth_at(nbytes)),
            scale * f.overhead_calls * c.overhead_s,
        )

    def serial_factor(
        self, kind: str, roofline_s: float, bytes_written: float, factors: KindFactors | None = None
    ) -> float:
        """S: by how much a call of this kind with roofline time `roofline_s` (at its factors, without
        the element scale) falls short of running on all the calibration's threads (1: not at all);
        with `factors`, at those (its hot ones). Sweep versions 4 and 5 size it by `bytes_written`."""
        f = factors or self.factors_of(kind)
        if f.half_parallel_bytes:
            return float(serial_share(bytes_written, f.half_parallel_bytes, self.ceilings.threads))
        return float(serial_share(roofline_s, f.half_parallel_s, self.ceilings.threads))

    def cached_share(self, cost: OpCost) -> float:
        """r of the module's docstring: the share of the bytes a call reads that are still in the
        threads' caches when it runs (0 without a cache size or reuse distances)."""
        read = cost.bytes_read + cost.bytes_weights
        if not self.cache_bytes or not read:
            return 0.0
        return sum(n for n, distance in cost.reads_reuse if n + distance <= self.cache_bytes) / read

    def _terms(self, kind: str, cost: OpCost, factors: KindFactors | None = None) -> tuple[float, ...]:
        """(compute, memory, serial, overhead, fresh pages) seconds of one call at this kind's factors
        (or `factors`, its hot ones); `serial` is what its serial share adds to the larger of the first two."""
        compute, memory, overhead = self.op_time_s(kind, cost.flops, cost.bytes, factors)
        roof = max(compute, memory)
        share = self.serial_factor(kind, roof / self.factors_of(kind).element_scale, cost.bytes_written, factors)
        serial = roof * (share - 1.0)
        return compute, memory, serial, overhead, self.ceilings.fresh_pages_s(cost.bytes_written)

    def predict(self, costs: Sequence[OpCost]) -> list[dict]:
        """Per top-level call: its kind, cost, predicted time and what dominates it. Its parts are its
        first-call time's (compute or memory, `serial_s`: what its serial share adds to the larger,
        overhead, fresh pages) and `reuse_s`, what reading inputs that are still in cache changes
        (negative: saved); they sum to the prediction."""

        def total(terms: tuple[float, ...]) -> float:
            compute, memory, serial, overhead, pages = terms
            return max(compute, memory) + serial + overhead + pages

        out = []
        for cost in costs:
            kind = fit_kind_of(cost)
            terms = self._terms(kind, cost)
            compute, memory, serial, overhead, pages = terms
            roof, first = max(compute, memory) + serial, total(terms)
            dominant = "overhead" if overhead >= roof else "compute" if compute >= memory else "memory"
            hot, cached = self.factors_of(kind).hot, self.cached_share(cost)
            reuse = cached * (total(self._terms(kind, cost, hot)) - first) if hot and cached else 0.0
            out.append(
                {
                    "index": cost.index,
                    "op": cost.name,
                    "module": cost.module,
                    "fit_kind": kind,
                    "flops": cost.flops,
                    "bytes": cost.bytes,
                    "predicted_s": first + reuse,
                    "compute_s": compute,
                    "memory_s": memory,
                    "serial_s": serial,
                    "overhead_s": overhead,
                    "fresh_pages_s": pages,
                    "reuse_s": reuse,
                    "cached_share": cached,
                    "dominant": dominant,
                }
            )
        return out

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "sweep_version": self.sweep_version,
            "cache_bytes": self.cache_bytes,
            "ceilings": self.ceilings.to_dict(),
            "factors": {k: f.to_dict() for k, f in self.factors.items()},
            "settings": self.settings,
            "cost_convention": COST_CONVENTION,
            "samples": [s.to_dict() for s in self.samples],
        }

    @classmethod
    def from_dict(cls, d: dict) -> LatencyModel:
        if d.get("schema") != SCHEMA or d.get("sweep_version") not in READABLE_SWEEP_VERSIONS:
            raise ValueError(
                f"not a latency model this version reads (schema {d.get('schema')!r}, sweep version "
                f"{d.get('sweep_version')!r}; readable: {', '.join(map(str, READABLE_SWEEP_VERSIONS))})"
            )
        return cls(
            ceilings=Ceilings.from_dict(d["ceilings"]),
            factors={k: KindFactors.from_dict(f) for k, f in d["factors"].items()},
            settings=d.get("settings", {}),
            samples=[Sample(**s) for s in d.get("samples", [])],
            sweep_version=d["sweep_version"],
            cache_bytes=d.get("cache_bytes", 0),
        )


def fit_latency_model(
    samples: Sequence[Sample],
    ceilings: Ceilings,
    settings: dict | None = None,
    *,
    serial: bool = True,
    cache_bytes: int = 0,
) -> LatencyModel:
    """Fit every kind that has samples; kinds without any use another's (`LatencyModel.factors_of`). `serial=False`:
    without the serial share (see `fit_kind_factors`); `cache_bytes`: the caches private to the threads
    (0: no cache reuse)."""
    by_kind: dict[str, list[Sample]] = {}
    for s in samples:
        by_kind.setdefault(s.kind, []).append(s)
    # the kinds' fits are independent and numpy releases the GIL: a thread per CPU (1.6-1.8x faster on two)
    with ThreadPoolExecutor(max_workers=len(usable_cpus())) as pool:
        fitted = pool.map(lambda group: fit_kind_factors(group, ceilings, serial), by_kind.values())
        factors = dict(zip(by_kind, fitted))
    return LatencyModel(ceilings, factors, settings or {}, list(samples), cache_bytes=cache_bytes)


def build_latency_model(
    ceilings: Ceilings,
    *,
    batch_sizes: Sequence[int] | None = None,
    quick: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> LatencyModel:
    """Run the operator micro-sweep under the ceilings' settings (device, precision, threads, clock) and fit."""
    device = ceilings.device
    cuda = str(device).startswith("cuda")
    batch_sizes = tuple(batch_sizes or ((1, 256) if cuda else (1, 16)))
    cells = QUICK_CELLS if quick else CELLS
    rounds = sweep_rounds(device)
    start = time.perf_counter()
    samples = run_op_sweep(
        device,
        threads=ceilings.threads,
        clock=ceilings.clock,
        precision=ceilings.precision,
        batch_sizes=batch_sizes,
        cells=cells,
        rounds=rounds,
        progress=progress,
    )
    settings = {
        "batch_sizes": list(batch_sizes),
        "cells": [list(c) for c in cells],
        "cases": len(CASES),
        "rounds": rounds.count,
        "quick": quick,
        "seconds": time.perf_counter() - start,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    cache = private_cache_bytes(device, ceilings.threads)
    return fit_latency_model(samples, ceilings, settings, cache_bytes=cache)


def read_latency_model(path: str | Path) -> LatencyModel:
    """A latency model from a file: one `cached_latency_model` wrote, or a calibration record
    (`lowformer analyze calibrate --out`), which holds one under "latency_model"."""
    data = json.loads(Path(path).read_text())
    return LatencyModel.from_dict(data.get("latency_model", data))


def latency_model_path(ceilings: Ceilings, folder: str | Path | None = None) -> Path:
    """Where the latency model fitted under these ceilings is cached: beside them, keyed alike."""
    key = cache_key(ceilings.device, ceilings.precision, ceilings.threads, ceilings.clock)
    key = {**key, "memory": ceilings.memory, "quick": bool(ceilings.details.get("quick")), "sweep": SWEEP_VERSION}
    return cache_path(key, kind="latency-model", folder=folder)


def cached_latency_model(
    ceilings: Ceilings,
    *,
    fresh: bool = False,
    folder: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[LatencyModel, bool]:
    """(model, whether it came from the cache) for these ceilings; a quick calibration gets a quick
    sweep. Measured again (and cached) when absent, unreadable or `fresh`."""
    path = latency_model_path(ceilings, folder)
    if not fresh:
        data = read_cached(path)
        if data is not None:
            try:
                return LatencyModel.from_dict(data), True
            except (KeyError, TypeError, ValueError) as e:
                _logger.warning("ignoring latency model file %s: %s", path, e)
    model = build_latency_model(ceilings, quick=bool(ceilings.details.get("quick")), progress=progress)
    write_json(path, model.to_dict())
    return model, False

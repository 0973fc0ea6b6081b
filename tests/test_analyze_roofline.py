"""Operator costs, device calibration, roofline attribution and the analytic latency model.

FLOPs and bytes are checked against hand-computed values; the calibration against itself on a repeat
(it is a measurement: the numbers must be positive and agree within a stated spread); the bound of an
operator against its arithmetic intensity; the latency model's fit against factors it must recover;
and the prediction, `analyze models` and the command line end to end on tiny models. Timings use
small sizes and short policies: nothing here depends on how fast this machine is.
"""

import copy
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lowformer.analyze import latency, opkinds, predict, roofline
from lowformer.analyze.latency import CASES, KindFactors, LatencyModel, Sample, fit_kind_factors, run_op_sweep
from lowformer.analyze.models import analyze_models
from lowformer.analyze.profile import profile_model
from lowformer.bench import TimingPolicy
from lowformer.cli import main
from lowformer.measure import calibrate as cal
from lowformer.measure.calibrate import CalibrationSizes, Ceilings
from lowformer.measure.env import keep_freed_memory, memory_mode
from lowformer.measure.opcost import count_call_cost, count_op_costs, op_costs
from lowformer.measure.profiler import OpCall
from lowformer.measure.timing import ThreadCpuTimer, check_clock
from lowformer.report import (
    format_calibration,
    format_models,
    format_predictions,
    format_roofline,
    plot_roofline,
    write_report,
)

F32 = 4  # bytes per element

TINY_SIZES = CalibrationSizes(matmul=(64, 128), copy_bytes=1 << 20, tiny_calls=50, repeats=3, small_copies=(1 << 16,))

# The spread two calibrations of this shared 2-core machine may differ by: other jobs come and go
# between the two, and a tiny copy or matmul sees them fully. A quiet machine agrees within ~10%.
CALIBRATION_SPREAD = 4.0


@pytest.fixture(autouse=True)
def _calibration_dir(tmp_path, monkeypatch):
    """No test writes a calibration into the user's cache."""
    monkeypatch.setenv(cal.CALIBRATION_ENV, str(tmp_path / "user-cache"))


@pytest.fixture(scope="module")
def ceilings() -> Ceilings:
    return cal.calibrate("cpu", "fp32", threads=1, clock="cpu", sizes=TINY_SIZES)


def synthetic_ceilings(**overrides) -> Ceilings:
    """Round numbers, so that expected times can be written down."""
    fields = dict(
        device="cpu",
        device_name="test cpu",
        precision="fp32",
        threads=1,
        clock="wall",
        torch=torch.__version__,
        flops_per_s=100e9,
        bytes_per_s=10e9,
        overhead_s=2e-6,
    )
    return Ceilings(**{**fields, **overrides})


# --------------------------------------------------------------------------------------------
# Operator costs: FLOPs and bytes of simple operators, by hand
# --------------------------------------------------------------------------------------------


def _one(module: nn.Module, shape) -> "object":
    (cost,) = count_op_costs(module, shape)
    return cost


def test_linear_costs():
    cost = _one(nn.Linear(8, 7), (2, 5, 8))  # (batch, tokens, features)
    assert cost.name == "aten::linear" and cost.macs == {"linear": 2 * 5 * 8 * 7}
    assert cost.flops == 2 * (2 * 5 * 8 * 7)
    assert cost.bytes_read == 2 * 5 * 8 * F32
    assert cost.bytes_weights == (7 * 8 + 7) * F32
    assert cost.bytes_written == 2 * 5 * 7 * F32
    assert cost.intensity == pytest.approx(cost.flops / (cost.bytes_read + cost.bytes_weights + cost.bytes_written))


def test_pointwise_conv_costs():
    cost = _one(nn.Conv2d(8, 16, 1), (1, 8, 10, 12))
    assert cost.flops == 2 * 16 * 10 * 12 * 8
    assert (cost.bytes_read, cost.bytes_weights, cost.bytes_written) == (
        8 * 120 * F32,
        (16 * 8 + 16) * F32,
        16 * 120 * F32,
    )


def test_depthwise_conv_costs():
    cost = _one(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), (3, 8, 10, 12))
    assert cost.macs == {"depthwise_conv": 3 * 8 * 120 * 9}
    assert cost.flops == 2 * 3 * 8 * 120 * 9
    assert (cost.bytes_read, cost.bytes_weights, cost.bytes_written) == (3 * 960 * F32, 8 * 9 * F32, 3 * 960 * F32)


class _TokensDepthwise(nn.Module):
    """A 3x3 depthwise conv on a token sequence (B, H*W, C) viewed as an image, as PVT-v2's MLP runs it."""

    def __init__(self, channels: int, size: int) -> None:
        super().__init__()
        self.size = size
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)

    def forward(self, x):
        b, n, c = x.shape
        return self.conv(x.transpose(1, 2).view(b, c, self.size, self.size))


def test_depthwise_conv_on_tokens_is_a_kind_of_its_own():
    """The same depthwise conv costs the same on a token view, but runs another kernel: at batch 1 the
    view is strided (its batch stride is C) and the conv copies it to NCHW first; at batch 2 it is
    channels-last. `image_layout` says what PyTorch's convolution decides."""
    image = _one(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), (1, 8, 10, 10))
    assert image.layout == "nchw"
    assert opkinds.fit_kind(image.name, image.input_shapes, image.transposed, image.bytes) == "depthwise_conv"
    for batch, layout in ((1, "strided"), (2, "channels_last")):
        *views, cost = count_op_costs(_TokensDepthwise(8, 10), (batch, 100, 8))
        assert [v.name for v in views] == ["aten::transpose", "aten::view"] and not any(v.bytes for v in views)
        assert cost.layout == layout
        assert (cost.flops, cost.bytes_read, cost.bytes_weights, cost.bytes_written) == (
            batch * image.flops,
            batch * image.bytes_read,
            image.bytes_weights,
            batch * image.bytes_written,
        )
        kind = opkinds.fit_kind_of(cost)
        assert kind == f"depthwise_conv_{layout}"
    # a larger kernel keeps its kind
    assert opkinds.fit_kind("aten::conv2d", [[1, 8, 9, 9], [8, 1, 7, 7]], layout="strided") == "depthwise_conv_large"


def test_image_layout_is_the_one_the_convolution_runs():
    """On a strided input PyTorch's convolution copies the input to NCHW (and writes NCHW); on a
    channels-last one it copies nothing and writes channels-last. A token view at batch 1 is strided
    though `is_contiguous(memory_format=torch.channels_last)` says it is channels-last."""
    from torch.profiler import profile

    from lowformer.measure.opcost import image_layout

    conv = nn.Conv2d(8, 8, 3, padding=1, groups=8).eval()
    tokens = torch.randn(1, 25, 8).transpose(1, 2).view(1, 8, 5, 5)
    assert tokens.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 5, 5)
    inputs = {
        "strided": [tokens, x.permute(0, 1, 3, 2)],
        "channels_last": [
            x.contiguous(memory_format=torch.channels_last),
            torch.randn(2, 25, 8).transpose(1, 2).view(2, 8, 5, 5),
        ],
        "nchw": [x, x[:1, :4].repeat(1, 2, 1, 1)],
    }
    with torch.no_grad():
        for layout, tensors in inputs.items():
            for t in tensors:
                assert image_layout(t) == layout
                with profile() as prof:
                    out = conv(t)
                copied = any(e.name in ("aten::contiguous", "aten::clone") for e in prof.events())
                assert copied == (layout == "strided"), layout
                assert image_layout(out) == ("channels_last" if layout == "channels_last" else "nchw"), layout
    assert image_layout(torch.zeros(2, 8, 5)) == ""


class _NormsKeepChannelsLast(nn.Module):
    """What ConvNeXt and PoolFormer do: a layer norm on a permuted image, permuted back, and a group norm,
    which keep the image channels-last on a CPU, so the convs and the pool after them run on channels-last
    inputs."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.ln = nn.LayerNorm(c)
        self.conv = nn.Conv2d(c, c, 1)
        self.gn = nn.GroupNorm(1, c)
        self.pool = nn.AvgPool2d(3, 1, 1)
        self.conv3 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        x = self.ln(self.stem(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = self.gn(self.conv(x))
        return self.conv3(self.pool(x) - x)


@pytest.mark.parametrize("batch", [1, 2])
def test_the_meta_walk_sees_the_layouts_the_model_runs_on(batch):
    """The meta kernels of convolution, group norm and layer norm lay their outputs out unlike the CPU
    kernels (NCHW after a channels-last input; a layer norm's strided input kept strided): the walk on the
    meta device gives every call the layout and kind it has when the model runs on the CPU."""
    model = _NormsKeepChannelsLast().eval()
    on_meta = count_op_costs(model, (batch, 3, 8, 8))
    on_cpu = count_op_costs(model, (batch, 3, 8, 8), device="cpu")
    assert [(c.name, c.layout, c.bytes, opkinds.fit_kind_of(c)) for c in on_meta] == [
        (c.name, c.layout, c.bytes, opkinds.fit_kind_of(c)) for c in on_cpu
    ]
    kinds = {c.name: opkinds.fit_kind_of(c) for c in on_meta}
    assert kinds["aten::avg_pool2d"] == "pool_channels_last"
    assert [opkinds.fit_kind_of(c) for c in on_meta if c.name == "aten::conv2d"] == [
        "conv_kxk",
        "conv_1x1_channels_last",
        "conv_kxk_channels_last",
    ]


def test_dense_convs_and_pools_on_channels_last_inputs_are_kinds_of_their_own():
    for layout, suffix in (("nchw", ""), ("channels_last", "_channels_last"), ("strided", "")):
        assert opkinds.fit_kind("aten::conv2d", [[1, 16, 8, 8], [32, 16, 1, 1]], layout=layout) == "conv_1x1" + suffix
        assert opkinds.fit_kind("aten::conv2d", [[1, 16, 8, 8], [32, 16, 3, 3]], layout=layout) == "conv_kxk" + suffix
        assert opkinds.fit_kind("aten::max_pool2d", [[1, 16, 8, 8]], layout=layout) == "pool" + suffix
    # grouped and depthwise convs keep their kinds (a 3x3 depthwise conv has its own channels-last kind)
    assert opkinds.fit_kind("aten::conv2d", [[1, 16, 8, 8], [16, 4, 3, 3]], layout="channels_last") == "grouped_conv"


class _Attention(nn.Module):
    """Attention on a conv's output: q, k and v are transposed chunks of one (B, heads, 3 x head_dim,
    tokens) tensor, as LowFormer's attention makes them (`transposed`), or chunks of a
    (B, heads, tokens, 3 x head_dim) one, whose rows stay contiguous."""

    def __init__(self, heads: int, transposed: bool) -> None:
        super().__init__()
        self.heads, self.transposed = heads, transposed

    def forward(self, x):
        b, c, h, w = x.shape
        if self.transposed:
            q, k, v = (t.transpose(-1, -2) for t in x.reshape(b, self.heads, c // self.heads, h * w).chunk(3, 2))
        else:
            q, k, v = x.reshape(b, self.heads, h * w, c // self.heads).chunk(3, -1)
        return F.scaled_dot_product_attention(q, k, v)


def test_sdpa_on_a_strided_head_dimension_is_a_kind_of_its_own():
    """The same attention costs the same whether its head dimension is contiguous or not, but runs
    another kernel; `inner_stride` records which."""
    rows, strided = (count_op_costs(_Attention(2, t), (1, 96, 7, 7))[-1] for t in (False, True))
    assert (rows.inner_stride, strided.inner_stride) == (1, 49)
    assert (rows.flops, rows.bytes) == (strided.flops, strided.bytes)
    kinds = [opkinds.fit_kind_of(c) for c in (rows, strided)]
    assert kinds == ["sdpa", "sdpa_strided"]
    assert opkinds.fit_kind("aten::matmul", [[1, 2, 49, 16], [1, 2, 16, 49]], inner_stride=49) == "matmul"


def test_inner_stride_is_what_sdpa_decides():
    """PyTorch's SDPA runs its fused CPU kernel on exactly the queries `inner_stride` gives 1: contiguous
    ones and permuted ones with contiguous rows; a transposed query (the latency model's "transposed"
    case, LowFormer's chunks) runs as matmuls and a softmax."""
    from torch.profiler import profile

    from lowformer.measure.opcost import inner_stride

    x = torch.randn(2, 2, 49, 96)
    queries = {
        "contiguous": x[..., :32].contiguous(),
        "permuted rows": torch.randn(2, 49, 2, 32).transpose(1, 2),
        "chunk of rows": x.chunk(3, -1)[0],
        "transposed": latency._laid_out(x[..., :32].contiguous(), "transposed"),
        "transposed chunk": x.transpose(-1, -2).contiguous().chunk(3, 2)[0].transpose(-1, -2),
    }
    for name, q in queries.items():
        assert q.shape == (2, 2, 49, 32), name
        with torch.no_grad(), profile() as prof:
            F.scaled_dot_product_attention(q, q, q)
        fused = any("flash_attention" in e.name for e in prof.events())
        assert fused == (inner_stride(q) == 1), name
    assert (inner_stride(torch.zeros(3, 1)), inner_stride(torch.zeros(())), inner_stride(x.mT)) == (1, 1, 96)


class _Add(nn.Module):
    def forward(self, x):
        return x + x.flip(0)  # two different tensors; flip is a copy of its own


def test_add_costs_and_copies():
    flip, add = count_op_costs(_Add(), (2, 8, 10, 12))
    n = 2 * 960
    assert (flip.name, flip.flops, flip.bytes_read, flip.bytes_written) == ("aten::flip", 0, n * F32, n * F32)
    assert add.name == "aten::add" and add.flops == n  # one FLOP per element
    assert (add.bytes_read, add.bytes_weights, add.bytes_written) == (2 * n * F32, 0, n * F32)


class _Block(nn.Module):
    """A view (no traffic), an in-place activation, an unfused attention (intermediates are internal)."""

    def __init__(self):
        super().__init__()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        t = self.act(x).flatten(2).transpose(1, 2)  # (B, 120 tokens, 8)
        return torch.nn.functional.scaled_dot_product_attention(t, t, t)


def test_views_in_place_ops_and_composite_intermediates():
    relu, flatten, transpose, sdpa = count_op_costs(_Block(), (1, 8, 10, 12))
    n = 960
    assert relu.module == "act" and (relu.bytes_read, relu.bytes_written) == (n * F32, n * F32)
    assert flatten.bytes == transpose.bytes == 0 and flatten.flops == 0
    # attention over 120 tokens: q k^T and attn v, 2 FLOPs per MAC, plus the softmax's elementwise work
    assert sdpa.macs == {"attention_matmul": 2 * 120 * 120 * 8}
    assert sdpa.flops >= 2 * 2 * 120 * 120 * 8
    # q = k = v are one tensor, read once; the 120 x 120 scores are computed and used inside the call
    assert sdpa.bytes_read == n * F32 and sdpa.bytes_written == n * F32


def test_reuse_distances_count_the_traffic_since_last_use():
    """conv -> batch norm -> ReLU (in place) -> 1x1 conv: each call reads what the call before it wrote at
    distance 0; a weight's (and the input's) last use is in the pass before, so its distance is the
    traffic of the whole pass after its own call and before it."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.Conv2d(8, 8, 1))
    conv, bn, relu, pointwise = count_op_costs(model, (1, 3, 8, 8))
    total = conv.bytes + bn.bytes + relu.bytes + pointwise.bytes
    x, w, b = 3 * 64 * F32, 8 * 3 * 9 * F32, 8 * F32
    assert sorted(conv.reads_reuse) == sorted(
        [[x, total - conv.bytes], [w, total - conv.bytes], [b, total - conv.bytes]]
    )
    assert [8 * 64 * F32, 0] in bn.reads_reuse and relu.reads_reuse == [[8 * 64 * F32, 0]]
    # the 1x1 conv reads the ReLU's output (written in place into the batch norm's) right after it
    assert [8 * 64 * F32, 0] in pointwise.reads_reuse
    assert [8 * 8 * F32, total - pointwise.bytes] in pointwise.reads_reuse
    for cost in (conv, bn, relu, pointwise):
        assert sum(n for n, _ in cost.reads_reuse) == cost.bytes_read + cost.bytes_weights


def test_private_cache_bytes_reads_the_level_2_caches(tmp_path):
    """Each level-2 cache of the CPUs a run's threads may use, once (two CPUs sharing one count it
    once); a machine that does not say gives 0."""
    from lowformer.measure.env import private_cache_bytes

    def cache(cpu, index, level, kind, size, shared):
        folder = tmp_path / f"cpu{cpu}" / "cache" / f"index{index}"
        folder.mkdir(parents=True)
        for name, text in (("level", level), ("type", kind), ("size", size), ("shared_cpu_list", shared)):
            (folder / name).write_text(text + "\n")

    cpus = sorted(os.sched_getaffinity(0))
    for cpu in cpus:
        cache(cpu, 0, "1", "Data", "32K", str(cpu))
        cache(cpu, 2, "2", "Unified", "1024K", str(cpu))
        cache(cpu, 3, "3", "Unified", "32M", ",".join(map(str, cpus)))
    assert private_cache_bytes("cpu", 1, sysfs=str(tmp_path)) == 2**20
    assert private_cache_bytes("cpu", None, sysfs=str(tmp_path)) == len(cpus) * 2**20
    shared = tmp_path / "shared"
    for cpu in cpus:  # one L2 shared by all of them
        folder = shared / f"cpu{cpu}" / "cache" / "index2"
        folder.mkdir(parents=True)
        for name, text in (("level", "2"), ("type", "Unified"), ("size", "2M"), ("shared_cpu_list", "0-63")):
            (folder / name).write_text(text)
    assert private_cache_bytes("cpu", None, sysfs=str(shared)) == 2 * 2**20
    assert private_cache_bytes("cpu", 2, sysfs=str(tmp_path / "absent")) == 0


def test_meta_costs_equal_real_costs_and_macs():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.Hardswish())
    meta = count_op_costs(model, (2, 3, 16, 16))
    real = op_costs(model.eval(), torch.zeros(2, 3, 16, 16))
    assert [(c.name, c.flops, c.bytes_read, c.bytes_weights) for c in meta] == [
        (c.name, c.flops, c.bytes_read, c.bytes_weights) for c in real
    ]
    # batch norm's saved statistics are empty on the CPU in eval mode, C floats each on meta
    assert [m.bytes_written - r.bytes_written for m, r in zip(meta, real)] == [0, 2 * 8 * F32, 0]
    assert [c.module for c in meta] == ["0", "1", "2"]
    assert next(model.parameters()).device.type == "cpu"  # the meta walk used a copy


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------


def test_calibration_is_positive_and_repeatable(ceilings):
    again = cal.calibrate("cpu", "fp32", threads=1, clock="cpu", sizes=TINY_SIZES)
    for c in (ceilings, again):
        assert c.flops_per_s > 1e8 and c.bytes_per_s > 1e8 and 0 < c.overhead_s < 1e-3
        assert c.threads == 1 and c.clock == "cpu" and c.fresh_page_s >= 0
        assert set(c.spread) == {"flops_per_s", "bytes_per_s", "overhead_s", "fresh_page_s"}
        assert all(v >= 1 for v in c.spread.values())
        assert list(c.bandwidth_curve) == [str(2 << 16)] and c.bandwidth_curve[str(2 << 16)] > 0
    for name in ("flops_per_s", "bytes_per_s", "overhead_s"):
        a, b = getattr(ceilings, name), getattr(again, name)
        assert max(a, b) / min(a, b) < CALIBRATION_SPREAD, (name, a, b)


def test_calibration_cache(tmp_path, monkeypatch):
    measured = []

    def tiny(device, precision, threads, clock, sizes):
        measured.append(1)
        return synthetic_ceilings(threads=threads, clock=clock)

    monkeypatch.setattr(cal, "calibrate", tiny)
    first, cached = cal.calibrated("cpu", threads=1, folder=tmp_path)
    assert not cached and measured == [1]
    second, cached = cal.calibrated("cpu", threads=1, folder=tmp_path)
    assert cached and measured == [1] and second.to_dict() == json.loads(json.dumps(first.to_dict()))
    cal.calibrated("cpu", threads=1, folder=tmp_path, fresh=True)
    cal.calibrated("cpu", threads=1, clock="cpu", folder=tmp_path)  # another clock: another calibration
    assert measured == [1, 1, 1] and len(list(tmp_path.glob("ceilings-*.json"))) == 2
    monkeypatch.setenv(cal.CALIBRATION_ENV, str(tmp_path / "env"))
    assert cal.calibration_dir() == tmp_path / "env"


def test_staleness_says_when_to_calibrate_again(monkeypatch):
    """A cached calibration is flagged when it is old or was measured at another load."""
    import datetime

    monkeypatch.setattr(cal, "cpu_load", lambda: (1.0, 2))
    now = datetime.datetime(2026, 12, 1, 12, 0, tzinfo=datetime.timezone.utc)
    fresh = synthetic_ceilings(date="2026-12-01T11:00:00+00:00", details={"load_avg_1m": 0.8})
    line, stale = cal.staleness(fresh, now)
    assert not stale and line == "calibrated 2026-12-01T11:00:00+00:00, 1.0 h ago, at load 0.8, now 1.0"
    old = synthetic_ceilings(date="2026-11-30T11:00:00+00:00", details={"load_avg_1m": 0.8})
    assert cal.staleness(old, now)[1]  # 25 h
    busy = synthetic_ceilings(date="2026-12-01T11:00:00+00:00", details={"load_avg_1m": 6.0})
    assert cal.staleness(busy, now)[1]  # load 6 then, 1 now, on 2 CPUs
    unknown = synthetic_ceilings(date="")  # an old cache without a date or load: no claim either way
    assert cal.staleness(unknown, now) == ("calibrated at an unknown time", False)
    assert "load_avg_1m" in cal.calibrate("cpu", "fp32", threads=1, sizes=TINY_SIZES).details


def test_bandwidth_curve_interpolates_in_log_size():
    c = synthetic_ceilings(bandwidth_curve={"1000": 40e9, "100000": 20e9}, details={"sizes": {"copy_bytes": 10**7}})
    assert c.bandwidth_at(10) == 40e9 and c.bandwidth_at(1000) == 40e9
    assert c.bandwidth_at(10_000) == pytest.approx(math.sqrt(40e9 * 20e9))
    assert c.bandwidth_at(10**9) == c.bytes_per_s


# --------------------------------------------------------------------------------------------
# Bounds and roofline attribution
# --------------------------------------------------------------------------------------------


class _Matmul(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.register_buffer("b", torch.randn(n, n))

    def forward(self, x):
        return x @ self.b


def test_memory_bound_and_compute_bound(ceilings):
    big_add = count_op_costs(_Add(), (64, 64, 32, 32))[1]  # 2M elements: 1/12 FLOP per byte
    matmul = _one(_Matmul(1024), (1024, 1024))  # 2 n^3 FLOPs over 3 n^2 floats: ~170 FLOP per byte
    tiny_add = count_op_costs(_Add(), (1, 2))[1]
    assert big_add.intensity < ceilings.ridge < matmul.intensity
    assert ceilings.bound(big_add.flops, big_add.bytes) == "memory"
    assert ceilings.bound(matmul.flops, matmul.bytes) == "compute"
    assert ceilings.bound(tiny_add.flops, tiny_add.bytes) == "overhead"


def test_stages():
    assert roofline.block_sequences(_Tiny()) == {"stages"}  # the stem is a sequence of layers, not blocks
    assert roofline.stage_of("stages.1.2", {"stages"}) == "stages.1"
    assert roofline.stage_of("stem.0", {"stages"}) == "stem" and roofline.stage_of("") == "(model)"


def test_match_calls_aligns_a_pass_that_differs():
    costs = count_op_costs(_Block(), (1, 8, 4, 4))
    names = [c.name for c in costs]
    calls = [OpCall(n, [], None, 10.0 * (i + 1)) for i, n in enumerate(names)] * 2
    assert roofline.match_calls(costs, calls, 2) == [[10.0, 10.0], [20.0, 20.0], [30.0, 30.0], [40.0, 40.0]]
    extra = [OpCall("aten::empty", [], None, 1.0)]
    skewed = extra + calls[:2] + calls[3:4]  # one pass: an extra call first, the transpose missing
    times = roofline.match_calls(costs, skewed, 1)
    assert times == [[10.0], [20.0], [], [40.0]]


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.stages = nn.Sequential(
            nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 32, 1), nn.GELU()),
            nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.Conv2d(32, 64, 1), nn.GELU()),
        )
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


def test_profile_places_every_call_on_the_roofline(ceilings, tmp_path):
    profile = profile_model(
        _Tiny(), device="cpu", image_size=32, iters=2, timing=TimingPolicy(1, 0.0, 2, 0.0), threads=1, clock="cpu",
        ceilings=ceilings, label="tiny",
    )  # fmt: skip
    data = profile.to_dict()
    roof = data["roofline"]
    assert data["settings"]["clock"] == "cpu" and roof["unmatched_calls"] == 0
    assert len(roof["ops"]) == 11 and all(o["time_ms"] > 0 for o in roof["ops"])
    assert {o["stage"] for o in roof["ops"]} == {"stem", "stages.0", "stages.1", "head", "(model)"}
    conv = roof["ops"][0]
    assert conv["op"] == "aten::conv2d" and conv["kind"] == "dense_conv"
    assert conv["flops"] == 2 * 16 * 16 * 16 * 3 * 9 and conv["bound"] in ("compute", "memory", "overhead")
    assert conv["achieved_flops_per_s"] == pytest.approx(conv["flops"] / (conv["time_ms"] / 1e3))
    assert conv["compute_share"] == pytest.approx(conv["achieved_flops_per_s"] / ceilings.flops_per_s)
    by_kind = {k["kind"]: k for k in roof["by_kind"]}
    assert by_kind["depthwise_conv"]["calls"] == 2 and by_kind["linear"]["calls"] == 1
    assert sum(k["time_ms"] for k in roof["by_kind"]) == pytest.approx(sum(o["time_ms"] for o in roof["ops"]))
    assert sum(s["time_share"] for s in roof["by_stage"]) == pytest.approx(1.0)
    text = format_roofline(data)
    assert "depthwise conv" in text and "stages.1" in text and "bound" in text
    profile.write_json(tmp_path / "profile-tiny-latency.json")
    png = plot_roofline(data, tmp_path / "profile-tiny-latency-roofline.png")
    assert png.stat().st_size > 5000
    md = write_report(tmp_path).read_text()
    assert "**Roofline.**" in md and "(profile-tiny-latency-roofline.png)" in md


# --------------------------------------------------------------------------------------------
# The latency model
# --------------------------------------------------------------------------------------------


def test_fit_recovers_known_factors():
    c = synthetic_ceilings()
    truth = KindFactors(0.4, 0.8, 5.0)
    samples = []
    for flops, nbytes in [(1e5, 1e5), (1e7, 1e5), (1e9, 1e6), (1e6, 1e7), (1e8, 1e8), (1e4, 1e3), (3e9, 1e7)]:
        t = float(latency._predict_s(flops, nbytes, truth, c)[0])
        samples.append(Sample("conv_1x1", "x", 8, 8, 1, int(flops), int(nbytes), t))
    fitted = fit_kind_factors(samples, c)
    assert fitted.compute_efficiency == pytest.approx(0.4, rel=0.05)
    assert fitted.memory_efficiency == pytest.approx(0.8, rel=0.05)
    assert fitted.overhead_calls == pytest.approx(5.0, rel=0.1)
    assert fitted.median_abs_error < 0.02 and fitted.samples == len(samples)


def test_fresh_pages_of_large_outputs():
    """Outputs larger than glibc's largest mmap threshold cost their pages at the calibrated fresh-page
    cost, smaller ones nothing; the fit takes the term as given and recovers the factors under it; a
    calibration file without the cost (an older one) loads with none."""
    c = synthetic_ceilings(fresh_page_s=2e-6)
    big = cal.FRESH_PAGES_ABOVE + cal.PAGE_BYTES
    assert c.fresh_pages_s(cal.FRESH_PAGES_ABOVE) == 0.0
    assert c.fresh_pages_s(big) == pytest.approx(2e-6 * big / 4096)
    old = {k: v for k, v in synthetic_ceilings().to_dict().items() if k != "fresh_page_s"}
    assert Ceilings.from_dict(old).fresh_pages_s(big) == 0.0
    # a ReLU on 64 x 512 x 512 writes 64 MiB: 16384 pages
    costs = count_op_costs(nn.ReLU(), (1, 64, 512, 512), device="meta")
    model = LatencyModel(c, {"activation": KindFactors(1.0, 1.0, 1.0)})
    pred = predict.predict_costs(costs, model)
    assert pred["fresh_pages_ms"] == pytest.approx(1e3 * 2e-6 * 16384)
    parts = ("compute_ms", "memory_ms", "overhead_ms", "fresh_pages_ms")
    assert sum(pred[k] for k in parts) == pytest.approx(pred["predicted_ms"])
    truth = KindFactors(0.4, 0.8, 5.0)
    samples = []
    for flops, nbytes, written in [(1e5, 1e5, 0), (1e9, 1e6, 0), (1e6, 1e8, 5e7), (1e8, 2e8, 1e8), (3e9, 1e7, 0)]:
        t = float(latency._predict_s(flops, nbytes, truth, c, written)[0])
        samples.append(Sample("conv_1x1", "x", 8, 8, 1, int(flops), int(nbytes), t, bytes_written=int(written)))
    assert samples[2].time_s > float(latency._predict_s(1e6, 1e8, truth, c)[0])  # the pages count
    fitted = fit_kind_factors(samples, c)
    assert fitted.compute_efficiency == pytest.approx(0.4, rel=0.05)
    assert fitted.memory_efficiency == pytest.approx(0.8, rel=0.05)


def _two_call_samples(first: KindFactors, hot: KindFactors, c: Ceilings) -> list[Sample]:
    """1x1 conv samples over a spread of sizes whose first calls take the time of `first` and whose hot
    calls that of `hot`."""
    samples = []
    for flops, nbytes in [(1e5, 1e5), (1e7, 1e5), (1e9, 1e6), (1e6, 1e7), (1e8, 1e8), (1e4, 1e3), (3e9, 1e7)]:
        t_first = float(latency._predict_s(flops, nbytes, first, c)[0])
        t_hot = float(latency._predict_s(flops, nbytes, hot, c)[0])
        samples.append(Sample("conv_1x1", "x", 8, 8, 1, int(flops), int(nbytes), t_first, t_hot))
    return samples


def test_first_and_hot_factors_are_fitted_apart():
    """The first-call factors, overhead included, are fitted on the first calls of each round and the hot
    ones on the second (hot) calls: samples made from two known factor sets, differing in overhead and
    memory efficiency, give back each where it belongs, and a prediction of a call with nothing in cache
    costs the first call's overhead (sweep versions 2-9 took it from the hot calls)."""
    c = synthetic_ceilings()
    first, hot = KindFactors(0.4, 0.8, 40.0), KindFactors(0.4, 1.6, 4.0)
    samples = _two_call_samples(first, hot, c)
    fitted = fit_kind_factors(samples, c)
    assert fitted.compute_efficiency == pytest.approx(0.4, rel=0.05)
    assert fitted.memory_efficiency == pytest.approx(0.8, rel=0.05)
    assert fitted.overhead_calls == pytest.approx(40.0, rel=0.1)
    assert fitted.first_call_overhead is None
    assert fitted.hot.overhead_calls == pytest.approx(4.0, rel=0.1)
    assert fitted.hot.memory_efficiency == pytest.approx(1.6, rel=0.05)
    assert fitted.median_abs_error < 0.02  # of the first-call fit on the first calls
    costs = count_op_costs(nn.Conv2d(8, 8, 1), (1, 8, 8, 8))
    (op,) = LatencyModel(c, {"conv_1x1": fitted}).predict(costs)  # no cache: nothing is reused
    assert op["fit_kind"] == "conv_1x1" and op["reuse_s"] == 0.0
    assert op["overhead_s"] == pytest.approx(40.0 * c.overhead_s, rel=0.1)
    text = format_calibration(c.to_dict(), LatencyModel(c, {"conv_1x1": fitted}, cache_bytes=2**21).to_dict())
    assert "hot overhead" in text and "1st-call overhead" not in text
    older = dataclasses.replace(fitted, overhead_calls=fitted.hot.overhead_calls, first_call_overhead=40.0)
    text = format_calibration(c.to_dict(), LatencyModel(c, {"conv_1x1": older}, cache_bytes=2**21).to_dict())
    assert "1st-call overhead" in text and "hot overhead" not in text


def test_serial_share_of_small_calls():
    """S(R) = 1 + (T - 1) h / (R + h): T for a call with no work, 1 + (T - 1) / 2 at R = h, towards 1
    for large calls; 1 without h, on one thread and on CUDA (threads None). A prediction adds
    max(compute, memory) x (S - 1) as `serial_s`, and the parts still sum to the total. R is the
    call's roofline time; a sweep version 4 or 5 file sizes the share by the output bytes instead."""
    h = 2.0**20
    assert latency.serial_share(0, h, 2) == pytest.approx(2.0)
    assert latency.serial_share(h, h, 2) == pytest.approx(1.5)
    assert latency.serial_share(h, h, 4) == pytest.approx(2.5)
    assert latency.serial_share(1e12, h, 2) == pytest.approx(1.0, abs=1e-5)
    assert latency.serial_share(0, 0.0, 2) == 1.0
    assert latency.serial_share(0, h, 1) == 1.0 and latency.serial_share(0, h, None) == 1.0
    c = synthetic_ceilings(threads=2)
    costs = count_op_costs(nn.ReLU(), (1, 64, 64, 64), device="meta")  # writes 1 MiB
    assert costs[0].bytes_written == 2**20
    parallel = LatencyModel(c, {"activation": KindFactors(1.0, 1.0, 1.0)})
    (p_op,) = parallel.predict(costs)
    roof = max(p_op["compute_s"], p_op["memory_s"])
    serial = LatencyModel(c, {"activation": KindFactors(1.0, 1.0, 1.0, half_parallel_s=roof)})
    by_bytes = LatencyModel(c, {"activation": KindFactors(1.0, 1.0, 1.0, half_parallel_bytes=h)})
    by_bytes_quarter = LatencyModel(c, {"activation": KindFactors(1.0, 1.0, 1.0, half_parallel_bytes=h / 3)})
    (s_op,), (b_op,), (q_op,) = serial.predict(costs), by_bytes.predict(costs), by_bytes_quarter.predict(costs)
    assert p_op["serial_s"] == 0.0
    assert s_op["serial_s"] == pytest.approx(0.5 * roof)
    assert s_op["predicted_s"] == pytest.approx(p_op["predicted_s"] + s_op["serial_s"])
    assert b_op["serial_s"] == pytest.approx(0.5 * roof) and q_op["serial_s"] == pytest.approx(0.25 * roof)
    pred = predict.predict_costs(costs, serial)
    parts = ("compute_ms", "memory_ms", "serial_ms", "overhead_ms", "fresh_pages_ms")
    assert pred["serial_ms"] > 0 and sum(pred[k] for k in parts) == pytest.approx(pred["predicted_ms"])
    one_thread = LatencyModel(synthetic_ceilings(), serial.factors)
    assert one_thread.predict(costs)[0]["serial_s"] == 0.0
    text = format_calibration(c.to_dict(), serial.to_dict())
    assert "half parallel at" in text and f"{roof * 1e6:.0f} us" in text and "x (1 + 1 x h / (that time + h))" in text
    text = format_calibration(c.to_dict(), by_bytes.to_dict())
    assert "1 MiB" in text and "x (1 + 1 x h / (output bytes + h))" in text
    assert "half parallel at" not in format_calibration(c.to_dict(), parallel.to_dict())


def test_fit_recovers_the_half_parallel_time():
    """Samples made with a known h on two threads give back h (within one of the times the fit tries)
    and the efficiencies; on one thread the fit tries no h; a factor record without h (sweep version 3 and
    before) loads with none."""
    c = synthetic_ceilings(threads=2)
    h = latency.SERIAL_HALVES[7]
    truth = KindFactors(0.4, 0.8, 5.0, half_parallel_s=h)
    samples = []
    for flops, nbytes, written in [(1e5, 1e5, 3e4), (1e7, 1e5, 4e4), (1e9, 1e6, 3e5), (1e6, 1e7, 3e6),
                                   (1e8, 1e8, 3e7), (1e4, 1e3, 3e2), (3e9, 1e7, 3e6), (1e9, 3e7, 1e7),
                                   (3e7, 3e6, 1e6), (2e8, 1e6, 2e5)]:  # fmt: skip
        t = float(latency._predict_s(flops, nbytes, truth, c, written)[0])
        samples.append(Sample("conv_1x1", "x", 8, 8, 1, int(flops), int(nbytes), t, bytes_written=int(written)))
    fitted = fit_kind_factors(samples, c)
    # h is chosen on coarse fits (every other grid point of the efficiencies, which R depends on): the
    # time tried nearest the truth or a neighbour (a factor 10^0.25 apart)
    assert h / 1.8 < fitted.half_parallel_s < h * 1.8 and fitted.half_parallel_bytes == 0.0
    assert fitted.compute_efficiency == pytest.approx(0.4, rel=0.05)
    assert fitted.memory_efficiency == pytest.approx(0.8, rel=0.05)
    assert fitted.median_abs_error < 0.02
    assert fit_kind_factors(samples, synthetic_ceilings()).half_parallel_s == 0.0
    old = {k: v for k, v in truth.to_dict().items() if k not in ("half_parallel_s", "half_parallel_bytes")}
    assert KindFactors(**old).half_parallel_s == KindFactors(**old).half_parallel_bytes == 0.0


def test_cache_reuse_blends_in_the_hot_factors():
    """A call whose reads still fit in the private cache takes its time at the hot factors, one whose
    reads do not its first-call time; `reuse_s` is the difference, and the parts still sum to the
    total. Without a cache size (a sweep version 4 file) nothing changes."""
    c = synthetic_ceilings()
    f = KindFactors(1.0, 0.25, 1.0, hot=KindFactors(1.0, 1.0, 1.0))
    costs = count_op_costs(nn.Sequential(nn.ReLU(), nn.ReLU()), (1, 8, 32, 32))
    size = 8 * 32 * 32 * F32
    cold = LatencyModel(c, {"activation": f})
    hot = LatencyModel(c, {"activation": f}, cache_bytes=2**30)
    tight = LatencyModel(c, {"activation": f}, cache_bytes=size)  # the tensor alone fits, not with the traffic between
    (first, second), (first_hot, second_hot) = cold.predict(costs), hot.predict(costs)
    assert first["reuse_s"] == second["reuse_s"] == 0.0 and first["cached_share"] == 0.0
    assert first_hot["cached_share"] == second_hot["cached_share"] == 1.0
    memory_s = lambda e: 2 * size / (e * c.bandwidth_at(2 * size))  # noqa: E731
    assert second_hot["predicted_s"] == pytest.approx(memory_s(1.0) + c.overhead_s)
    assert second_hot["reuse_s"] == pytest.approx(memory_s(1.0) - memory_s(0.25))
    # in the tight cache the second ReLU reads the first's output right after it; the first reads the
    # input, which a whole pass of traffic separates from its last use
    assert [op["cached_share"] for op in tight.predict(costs)] == [0.0, 1.0]
    pred = predict.predict_costs(costs, hot)
    parts = ("compute_ms", "memory_ms", "serial_ms", "overhead_ms", "fresh_pages_ms", "reuse_ms")
    assert pred["reuse_ms"] < 0 and sum(pred[k] for k in parts) == pytest.approx(pred["predicted_ms"])
    assert "reuse" in format_predictions({"settings": {"batch_size": 1, "image_size": [32, 32], "precision": "fp32"},
                                          "latency_model": hot.to_dict(), "models": []})  # fmt: skip
    text = format_calibration(c.to_dict(), LatencyModel(c, {"activation": f}, cache_bytes=2**21).to_dict())
    assert "hot memory eff." in text and "2 MiB private cache" in text
    assert "hot memory eff." not in format_calibration(c.to_dict(), cold.to_dict())
    loaded = LatencyModel.from_dict(json.loads(json.dumps(hot.to_dict())))
    assert loaded.cache_bytes == 2**30 and loaded.factors["activation"].hot == f.hot


def test_fit_recovers_the_hot_factors():
    """Samples whose first calls follow one factor set and whose hot calls another give back both: the
    first calls' efficiencies, and the hot calls' as `hot`."""
    c = synthetic_ceilings()
    first, hot = KindFactors(0.4, 0.2, 4.0), KindFactors(0.5, 0.8, 4.0)
    samples = _two_call_samples(first, hot, c)
    fitted = fit_kind_factors(samples, c)
    assert fitted.memory_efficiency == pytest.approx(0.2, rel=0.05)
    assert fitted.hot.compute_efficiency == pytest.approx(0.5, rel=0.05)
    assert fitted.hot.memory_efficiency == pytest.approx(0.8, rel=0.05)
    assert fitted.hot.overhead_calls == pytest.approx(4.0, rel=0.1)
    first_only = [dataclasses.replace(s, hot_time_s=None) for s in samples]
    assert fit_kind_factors(first_only, c).hot is None


def test_sweep_times_each_case_cold_then_hot(latency_model):
    """Every sample has both calls; at batch 1, a view or an add costs less right after itself."""
    assert all(s.time_s > 0 and s.hot_time_s > 0 for s in latency_model.samples)
    cheap = [s for s in latency_model.samples if s.kind in ("view", "elementwise", "activation")]
    assert statistics.median(s.hot_time_s / s.time_s for s in cheap) < 1.0


def test_older_sweep_files_still_load(latency_model):
    """A file of the first sweep version (one call per round, no hot times) loads and keeps its
    version; a version this code does not know is refused with what it reads."""
    old = latency_model.to_dict()
    old["sweep_version"] = 1
    for sample in old["samples"]:
        del sample["hot_time_s"]
    for factors in old["factors"].values():
        del factors["first_call_overhead"], factors["hot"]
    del old["cache_bytes"]
    model = LatencyModel.from_dict(old)
    assert model.sweep_version == 1 and model.to_dict()["sweep_version"] == 1
    assert all(s.hot_time_s is None for s in model.samples)
    assert all(f.hot is None for f in model.factors.values()) and model.cache_bytes == 0
    with pytest.raises(ValueError, match="readable: 1, 2"):
        LatencyModel.from_dict({**old, "sweep_version": 99})


def test_a_file_without_a_later_kind_uses_the_kind_it_split_from(latency_model):
    """Sweep versions before 7 have no depthwise cases on channels-last or strided inputs, before 8 no
    SDPA case with a strided head dimension, before 9 no dense conv or pool on channels-last inputs: their
    files predict those calls with the factors of the kind each was split off from, and a kind no sweep
    has with the elementwise ones."""
    old = latency_model.to_dict()
    old["sweep_version"] = 6
    for kind in opkinds.FALLBACK_KINDS:
        del old["factors"][kind]
    model = LatencyModel.from_dict(old)
    assert set(opkinds.FALLBACK_KINDS) == {
        "depthwise_conv_channels_last",
        "depthwise_conv_strided",
        "sdpa_strided",
        "conv_1x1_channels_last",
        "conv_kxk_channels_last",
        "pool_channels_last",
    }
    for kind, parent in opkinds.FALLBACK_KINDS.items():
        assert model.factors_of(kind) is model.factors[parent]
        fitted = latency_model.factors_of(kind)
        assert fitted is not latency_model.factors[parent] and fitted.samples > 0
    assert model.factors_of("no such kind") is model.factors["elementwise"]
    calls = [p for p in model.predict(count_op_costs(_TokensDepthwise(16, 8), (1, 64, 16))) if p["flops"]]
    image = model.predict(count_op_costs(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), (1, 16, 8, 8)))
    assert [p["fit_kind"] for p in calls] == ["depthwise_conv_strided"]
    assert calls[0]["predicted_s"] == pytest.approx(image[0]["predicted_s"])


def test_every_case_runs_one_call_of_its_kind():
    """The sweep counts a case without the profiler, as one call: the profiler's walk must find one
    top-level call of the case's kind with the same FLOPs and bytes."""
    for case in CASES:
        module, shape = case.build(32, 8, 2)
        x = latency._laid_out(torch.zeros(shape, device="meta"), case.layout)
        (cost,) = op_costs(copy.deepcopy(module).to("meta"), x)
        kind = opkinds.fit_kind_of(cost)
        assert kind == case.kind, case.label
        swept = latency._case_cost(module, shape, case.layout)
        assert (swept.flops, swept.bytes, swept.bytes_written) == (cost.flops, cost.bytes, cost.bytes_written)
    assert {case.kind for case in CASES} == set(opkinds.FIT_KINDS)


def test_call_cost_sums_every_aten_call_and_tells_no_call_apart():
    linear = nn.Linear(16, 8)  # aten::linear runs t and addmm: one call, both counted
    (cost,) = count_op_costs(linear, (4, 16))
    whole = count_call_cost(linear, (4, 16))
    assert (whole.flops, whole.bytes_read, whole.bytes_weights, whole.bytes_written) == (
        cost.flops,
        cost.bytes_read,
        cost.bytes_weights,
        cost.bytes_written,
    )
    assert whole.flops == 2 * 4 * 16 * 8 and whole.bytes_weights == (16 * 8 + 8) * 4
    # eval-mode dropout is one top-level call that dispatches nothing; a layout the tensor has is no call
    assert count_call_cost(nn.Dropout(0.1), (2, 8)) is None
    dropout = latency._case_cost(nn.Dropout(0.1), (2, 8))
    assert dropout is not None and dropout.bytes == 0
    channels_last = latency._Op(lambda x: x.contiguous(memory_format=torch.channels_last))
    assert latency._case_cost(channels_last, (1, 8, 1, 1)) is None
    # at one pixel and batch 1 an image is NCHW and channels-last at once, and a single token transposed is
    # contiguous: the layout cases are not swept there
    for case in [c for c in CASES if c.layout != "nchw"]:
        assert latency._case_cost(*case.build(8, 1, 1), case.layout) is None
        cost = latency._case_cost(*case.build(8, 2, 1), case.layout)
        if case.layout == "transposed":
            assert cost.inner_stride == 4 and cost.layout == "strided"  # 4 tokens: the head dimension's stride
        else:
            assert cost.layout == case.layout and cost.inner_stride != 1


@pytest.mark.parametrize(
    "name, shapes, kind",
    [
        ("aten::conv2d", [[1, 16, 8, 8], [32, 16, 1, 1]], "conv_1x1"),
        ("aten::conv2d", [[1, 16, 8, 8], [32, 16, 3, 3]], "conv_kxk"),
        ("aten::conv2d", [[1, 16, 8, 8], [16, 4, 3, 3]], "grouped_conv"),
        ("aten::conv2d", [[1, 16, 8, 8], [16, 1, 3, 3]], "depthwise_conv"),
        ("aten::conv2d", [[1, 16, 8, 8], [16, 1, 7, 7]], "depthwise_conv_large"),
        ("aten::conv2d", [[1, 16, 8, 8], [16, 1, 1, 1]], "depthwise_conv_1x1"),
        ("aten::conv2d", [[1, 16, 8, 8], [32, 1, 3, 3]], "depthwise_multiplier"),
        ("aten::layer_norm", [], "layer_norm"),
        ("aten::gelu", [], "activation_exp"),
        ("aten::hardswish_", [], "activation"),
        ("aten::adaptive_avg_pool2d", [], "reduce"),
        ("aten::dropout", [], "view"),
        ("aten::cumsum", [], "reduce"),
        ("aten::sin", [], "activation_exp"),
        ("aten::bitwise_not", [], "elementwise"),
    ],
)
def test_fit_kinds(name, shapes, kind):
    assert opkinds.fit_kind(name, shapes) == kind


@pytest.fixture(scope="module")
def latency_model(ceilings) -> LatencyModel:
    rounds = latency.sweep_rounds("cpu")
    samples = run_op_sweep("cpu", threads=1, clock="cpu", batch_sizes=(1,), cells=((16, 8),), rounds=rounds)
    return latency.fit_latency_model(samples, ceilings, {"batch_sizes": [1]})


def test_prediction_end_to_end(latency_model, tmp_path):
    assert set(latency_model.factors) == set(opkinds.FIT_KINDS)
    report = predict.predict_models([_Tiny(), "timm:test_resnet"], latency_model, batch_size=2, image_size=32)
    data = report.to_dict()
    tiny, resnet = data["models"]
    assert tiny["calls"] == 11 and tiny["batch_size"] == 2 and tiny["macs"] > 0
    assert tiny["predicted_ms"] > 0
    parts = ("compute_ms", "memory_ms", "serial_ms", "overhead_ms", "fresh_pages_ms")
    assert sum(tiny[k] for k in parts) == pytest.approx(tiny["predicted_ms"])
    assert sum(k["predicted_ms"] for k in tiny["by_kind"].values()) == pytest.approx(tiny["predicted_ms"])
    # the sum over calls, each at its kind's factors
    costs = count_op_costs(_Tiny(), (2, 3, 32, 32))
    by_hand = 0.0
    for x in costs:
        kind = opkinds.fit_kind(x.name, x.input_shapes, x.transposed, x.bytes)
        c, m, o = latency_model.op_time_s(kind, x.flops, x.bytes)
        by_hand += max(c, m) * latency_model.serial_factor(kind, max(c, m), x.bytes_written) + o
    assert tiny["predicted_ms"] == pytest.approx(1e3 * by_hand)
    assert resnet["source"] == "timm" and resnet["predicted_ms"] > 0
    assert "test_resnet" in format_predictions(data)
    report.write_json(tmp_path / "predict-b2.json")
    report.write_csv(tmp_path / "predict-b2.csv")
    assert "## Predicted time: batch 2" in write_report(tmp_path).read_text()
    again = LatencyModel.from_dict(json.loads(json.dumps(latency_model.to_dict())))
    assert again.factors == latency_model.factors
    assert "1x1 conv" in format_calibration(latency_model.ceilings.to_dict(), latency_model.to_dict())


def _net(width: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1))


def test_models_judge_macs_params_and_the_prediction(latency_model):
    models = [(f"net{w}", _net(w)) for w in (4, 8, 16, 32)]
    timing = TimingPolicy(warmup_iters=1, warmup_s=0.0, min_iters=2, min_s=0.0)
    report = analyze_models(
        models, device="cpu", batch_size=2, image_size=32, timing=timing, rounds=2, threads=1, clock="cpu",
        keep_memory=True, latency_model=latency_model,
    )  # fmt: skip
    data = report.to_dict()
    assert data["bench"]["settings"]["clock"] == "cpu" and data["bench"]["environment"]["memory"] == "keep"
    assert {(p["model"], p["batch_size"]) for p in data["predictions"]} == {
        (f"net{w}", b) for w in (4, 8, 16, 32) for b in (1, 2)
    }
    assert [(j["mode"], j["batch_size"]) for j in data["judgement"]] == [("throughput", 2), ("latency", 1)]
    for j in data["judgement"]:
        for key in ("spearman_macs", "spearman_params", "spearman_predicted", "kendall_predicted"):
            assert -1 <= j[key] <= 1, key
        errors = sorted(abs(e) for e in j["errors"].values())
        assert j["median_abs_error"] == pytest.approx((errors[1] + errors[2]) / 2)
        assert j["max_abs_error"] == pytest.approx(errors[-1])
    assert all(r["iterations"] >= 2 and r["timer"] == "thread_cpu_time" for r in data["bench"]["results"])
    assert data["ranks"][0]["predicted_latency_ms"] > 0
    # the compute probe ran in each mode's rounds (before each of the 4 models, 2 rounds, >= 1 call each)
    # and every prediction is also given at the speed it found
    assert [(p["mode"], p["batch_size"]) for p in data["probes"]] == [("throughput", 2), ("latency", 1)]
    scales = {}
    for probe in data["probes"]:
        assert probe["calls"] >= 4 * 2 and probe["flops_per_s"] > 0
        assert probe["time_scale"] == pytest.approx(latency_model.ceilings.flops_per_s / probe["flops_per_s"])
        scales[probe["batch_size"]] = probe["time_scale"]
    for p in data["predictions"]:
        assert p["time_scale"] == scales[p["batch_size"]]
        assert p["predicted_ms_at_probe_speed"] == pytest.approx(p["predicted_ms"] * p["time_scale"])
        assert sum(k["predicted_ms"] for k in p["by_kind"].values()) == pytest.approx(p["predicted_ms"])
    assert all("median_abs_error_at_probe_speed" in j for j in data["judgement"])
    assert "compute ceiling re-measured between the models" in format_models(data)


def test_probes_are_spread_between_the_models(ceilings):
    from lowformer.analyze.models import _with_probes
    from lowformer.measure.calibrate import compute_probe

    mixed, at = _with_probes(list("abcdefghij"), "P", 4)  # every 3rd model
    assert "".join(mixed) == "PabcPdefPghiPj" and [mixed[i] for i in at] == ["P"] * 4
    assert _with_probes(["a"], "P", 4) == (["P", "a"], [0])
    step, flops = compute_probe(ceilings)
    n = ceilings.details["matmul_size"]
    assert step().shape == (n, n) and flops == 2 * n**3
    with pytest.raises(ValueError, match="calibrate"):
        compute_probe(dataclasses.replace(ceilings, details={}))


@pytest.mark.parametrize("name, band", [("isomacs24", (0.75, 1.45)), ("isomacs24-large", (1.45, 2.6))])
def test_isomacs_sets_keep_to_their_band(name, band):
    """`--set isomacs24` and `isomacs24-large` are defined by a MAC band at 224 px, chosen before any
    timing: every member must lie in it, counted on the meta device (no weights, no compute), and
    the two sets share no model."""
    from lowformer import create_model
    from lowformer.analyze.models import model_set
    from lowformer.measure.macs import count_macs

    names = model_set(name)
    assert len(set(names)) == 24
    assert not set(model_set("isomacs24")) & set(model_set("isomacs24-large"))
    for model_name in names:
        with torch.device("meta"):
            model = create_model(model_name)
        gmacs = count_macs(model, 224, device="meta").macs / 1e9
        assert band[0] <= gmacs <= band[1], (model_name, gmacs)


# --------------------------------------------------------------------------------------------
# Clock and allocator
# --------------------------------------------------------------------------------------------


def test_thread_cpu_timer_counts_work_not_waiting():
    timer = ThreadCpuTimer()
    assert timer.time(lambda: time.sleep(0.02)) < 0.01

    def spin():
        end = time.thread_time() + 0.01
        while time.thread_time() < end:
            pass

    assert timer.time(spin) >= 0.01
    with pytest.raises(ValueError, match="--threads 1"):
        check_clock("cpu", "cpu", None)
    with pytest.raises(ValueError, match="CUDA events"):
        check_clock("cpu", "cuda", 1)
    check_clock("cpu", "cpu", 1)


def test_keep_freed_memory_is_scoped():
    assert memory_mode() == "default"
    with keep_freed_memory():
        assert memory_mode() == "keep"
        with keep_freed_memory():  # nested: the outer one restores
            assert memory_mode() == "keep"
        assert memory_mode() == "keep"
    assert memory_mode() == "default"
    with keep_freed_memory(False):
        assert memory_mode() == "default"


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


@pytest.fixture()
def calibration_dir(tmp_path, latency_model):
    """A calibration cache holding the tiny latency model for the settings the CLI tests use."""
    folder = tmp_path / "calibration"
    c = latency_model.ceilings
    ceilings = Ceilings.from_dict({**c.to_dict(), "details": {**c.details, "quick": True}})
    cal.write_json(cal.calibration_path("cpu", "fp32", 1, "cpu", True, folder), ceilings.to_dict())
    model = LatencyModel(ceilings, latency_model.factors, latency_model.settings, latency_model.samples)
    cal.write_json(latency.latency_model_path(ceilings, folder), model.to_dict())
    return folder


def _cli(*args, folder):
    base = ["--quick", "--threads", "1", "--clock", "cpu", "--calibration-dir", str(folder)]
    return main(["analyze", *args, *base])


def test_cli_calibrate_predict_and_model(calibration_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cal, "calibrate", lambda *a, **k: pytest.fail("the cached calibration must be used"))
    out = tmp_path / "out"
    assert _cli("calibrate", "--out", str(out), folder=calibration_dir) == 0
    assert "calibration from the cache" in capsys.readouterr().out
    assert (out / "calibration-cpu-fp32-quick.json").exists()
    assert _cli("predict", "timm:test_resnet", "--batch-size", "2", "--image-size", "32", "--out", str(out),
                folder=calibration_dir) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "test_resnet" in printed and (out / "predict-b2.json").exists()
    assert "using the cached calibration (calibrated 20" in printed  # the user sees how old it is
    args = ["model", "timm:test_resnet", "--image-size", "32", "--iters", "1", "--out", str(out)]
    assert _cli(*args, folder=calibration_dir) == 0
    assert "bound (share of time)" in capsys.readouterr().out
    assert (out / "profile-timm_test_resnet-latency-roofline.png").exists()
    md = (out / "report.md").read_text()
    assert "## Device calibration" in md and "## Predicted time" in md and "**Roofline.**" in md


@pytest.mark.parametrize(
    "args, message",
    [
        (["predict", "lowformr_b1"], "Did you mean lowformer_b1"),
        (["predict", "lowformer_b1", "--clock", "cpu"], "--threads 1"),
        (["model", "lowformer_b1", "--clock", "cpu", "--threads", "2"], "--threads 1"),
        (["calibrate", "--clock", "sundial"], "invalid choice"),
        (["models", "--set", "nope"], "invalid choice"),
        (["models", "lowformer_b0", "--set", "bench"], "not both"),
        (["predict"], "the following arguments are required: MODEL"),
    ],
)
def test_cli_usage_errors_exit_2(args, message, capsys, monkeypatch):
    monkeypatch.setattr(cal, "calibrate", lambda *a, **k: pytest.fail("nothing may be measured"))
    try:
        code = main(["analyze", *args])
    except SystemExit as e:  # argparse
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", ["calibrate", "predict", "model", "models"])
def test_cli_unwritable_output_exits_1_before_any_work(command, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cal, "calibrate", lambda *a, **k: pytest.fail("nothing may be measured"))
    out = tmp_path / "afile"
    out.write_text("not a folder")
    args = {"calibrate": [], "predict": ["lowformer_b0"], "model": ["lowformer_b0"], "models": ["--set", "bench"]}
    assert main(["analyze", command, *args[command], "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"lowformer analyze: error: cannot write {out}: it is a file, not a folder\n"


def test_cli_unwritable_calibration_dir_exits_1(tmp_path, capsys):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file")
    assert main(["analyze", "predict", "lowformer_b0", "--calibration-dir", str(blocked), "--out", str(tmp_path)]) == 1
    assert "cannot write" in capsys.readouterr().err


def test_cli_ctrl_c_exits_130(calibration_dir, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("lowformer.cli.analyze.predict_models", interrupted)
    code = _cli("predict", "timm:test_resnet", "--image-size", "32", "--out", str(tmp_path), folder=calibration_dir)
    assert code == 130 and capsys.readouterr().err == "lowformer analyze: interrupted\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the profiler's log is left on where CUDA is")
def test_profiler_log_stays_off_stderr():
    """Counting costs starts the profiler; its per-start log lines must not reach the user's terminal."""
    code = (
        "from torch import nn; from lowformer.measure.opcost import count_op_costs; "
        "count_op_costs(nn.Linear(4, 4), (1, 4)); count_op_costs(nn.Linear(4, 4), (1, 4))"
    )
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "USDT" not in done.stderr and "profiler_start" not in done.stderr, done.stderr

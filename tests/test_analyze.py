"""`lowformer analyze`: MAC counts of the design elements against closed forms, grid bookkeeping, the
cell cache, the time budget, CSV/JSON/report output, and the command line.

Correctness only: nothing here depends on how fast anything ran. Timings use a tiny policy.
"""

import csv
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from lowformer.analyze import (
    ROW_COLUMNS,
    ElementPair,
    ElementTiming,
    Side,
    analyze_elements,
    analyze_models,
    classify_op,
    count_sides,
    get_pair,
    list_pairs,
    plan_cells,
    profile_model,
    register_pair,
    unregister_pair,
)
from lowformer.analyze import sweep as sweep_mod
from lowformer.analyze.cells import element_rows
from lowformer.analyze.elements import mhsa_heads
from lowformer.bench import TimingPolicy
from lowformer.cli import main
from lowformer.models.lowformer import lowtention_heads
from lowformer.report import (
    format_elements,
    format_profile,
    plot_element_heatmaps,
    plot_models,
    plot_profile,
    write_report,
)


@pytest.fixture(autouse=True)
def _calibration_dir(tmp_path, monkeypatch):
    """No test writes a calibration into the user's cache."""
    monkeypatch.setenv("LOWFORMER_CALIBRATION_DIR", str(tmp_path / "calibration"))


TINY = ElementTiming(
    warmup=TimingPolicy(warmup_iters=1, warmup_s=0.0, min_iters=1, min_s=0.0),
    round=TimingPolicy(warmup_iters=0, warmup_s=0.0, min_iters=1, min_s=0.0),
    rounds=2,
)
BUILTIN = ["fused-mbconv", "depthwise-conv", "lowtention", "attention-stride", "norm", "activation", "upsampling"]


def _sweep(pairs, channels=(8,), resolutions=(4,), **kw):
    kw.setdefault("device", "cpu")
    kw.setdefault("timing", TINY)
    kw.setdefault("threads", 1)  # one thread: tiny ops on a busy 2-core machine wait on each other otherwise
    return analyze_elements(pairs, channels=list(channels), resolutions=list(resolutions), **kw)


# --------------------------------------------------------------------------------------------
# MAC counts of every built-in element against closed forms
# --------------------------------------------------------------------------------------------


def _lowtention_macs(C: int, R: int, stride: int) -> dict[str, int]:
    heads, head_dim = lowtention_heads(C)
    A = heads * head_dim  # attention width (C / 2)
    if stride == 2:
        h = -(-R // 2)  # 5x5 depthwise, stride 2, padding 2
        return {
            "depthwise_conv": h * h * C * 25,
            "conv": h * h * C * 3 * A,  # 1x1 to q, k, v
            "attention_matmul": 2 * h**4 * A,  # q @ k^T and attn @ v over h*h tokens
            "transposed_conv": A * h * h * C * 16,  # 4x4 kernel, counted per input pixel
        }
    return {
        "depthwise_conv": R * R * C * 9,
        "conv": R * R * C * 3 * A,
        "attention_matmul": 2 * R**4 * A,
        "transposed_conv": A * R * R * C * 9,
    }


def _add(*dicts: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return {k: v for k, v in out.items() if v}


def _closed_forms(C: int, R: int) -> dict[str, dict[str, dict[str, int]]]:
    P = R * R
    fused_local = {"conv": 36 * P * C * C + 4 * P * C * C}  # 3x3 C->4C, then 1x1 4C->C
    mhsa = {"conv": P * C * 3 * C + P * C * C, "attention_matmul": 2 * P * P * C}
    return {
        "fused-mbconv": {
            "fused": fused_local,
            "unfused": {"conv": 8 * P * C * C, "depthwise_conv": 36 * P * C},  # 1x1 up/down, 3x3 dw on 4C
        },
        "depthwise-conv": {"depthwise": {"depthwise_conv": 9 * P * C}, "dense": {"conv": 9 * P * C * C}},
        "lowtention": {
            "lowtention": _add(_lowtention_macs(C, R, 2), fused_local),
            "mhsa": _add(mhsa, fused_local),
            "none": fused_local,
        },
        "attention-stride": {"stride2": _lowtention_macs(C, R, 2), "stride1": _lowtention_macs(C, R, 1)},
        "norm": {side: {"conv": P * C * C} for side in ("groupnorm1", "batchnorm", "layernorm")},
        "activation": {side: {"conv": P * C * C} for side in ("hardswish", "gelu", "relu")},
        "upsampling": {
            "transposed": {"transposed_conv": P * C * C * 4},  # 2x2 kernel per input pixel
            "interpolate": {"conv": P * C * C},  # 1x1 at the input resolution, then bilinear (uncounted)
            "pixelshuffle": {"conv": P * C * 4 * C},
        },
    }


@pytest.mark.parametrize("channels, resolution", [(64, 14), (48, 7)])
@pytest.mark.parametrize("pair", BUILTIN)
def test_element_macs_match_closed_forms(pair, channels, resolution):
    sides, _ = count_sides(get_pair(pair), channels, resolution)
    expected = _closed_forms(channels, resolution)[pair]
    assert [s.label for s in sides] == list(expected)
    for side in sides:
        assert side.by_op == expected[side.label], side.label
        assert side.macs == sum(expected[side.label].values())
        assert side.params > 0


def test_mac_ratios_of_the_paper_figure():
    """Fused MBConv always has more MACs than MBConv at expansion 4: 40C / (8C + 36)."""
    for c in (16, 64, 512):
        fused, unfused = count_sides(get_pair("fused-mbconv"), c, 14)[0]
        assert fused.macs / unfused.macs == pytest.approx(40 * c / (8 * c + 36))
        assert fused.macs > unfused.macs


def test_meta_count_equals_cpu_count():
    pair = get_pair("lowtention")
    meta, fp_meta = sweep_mod._count_sides(pair, 32, 9, "meta")
    cpu, fp_cpu = sweep_mod._count_sides(pair, 32, 9, "cpu")
    assert [(s.macs, s.params) for s in meta] == [(s.macs, s.params) for s in cpu]
    assert fp_meta == fp_cpu  # module structure, not where it lives


def test_mhsa_heads_divide_the_width():
    assert [mhsa_heads(c) for c in (8, 16, 64, 96, 100, 512)] == [1, 1, 2, 3, 2, 16]
    assert all(c % mhsa_heads(c) == 0 for c in range(8, 600))


# --------------------------------------------------------------------------------------------
# Registry and grid bookkeeping
# --------------------------------------------------------------------------------------------


def test_builtin_pairs_are_registered():
    assert list_pairs()[: len(BUILTIN)] == BUILTIN
    assert [len(get_pair(p).sides) for p in BUILTIN] == [2, 2, 3, 2, 3, 3, 3]


def test_unknown_pair_suggests_close_matches():
    with pytest.raises(ValueError, match="Did you mean fused-mbconv"):
        get_pair("fused-mbcov")


def test_bad_pair_definitions_are_refused():
    side = Side("a", lambda c, r: nn.Identity())
    with pytest.raises(ValueError, match="at least two sides"):
        ElementPair("one-side", sides=(side,), description="x")
    with pytest.raises(ValueError, match="labels must differ"):
        ElementPair("same", sides=(side, side), description="x")
    with pytest.raises(ValueError, match="lowercase"):
        ElementPair("Bad Name", sides=(side, Side("b", side.build)), description="x")
    with pytest.raises(ValueError, match="already registered"):
        register_pair(get_pair("norm"))


def test_plan_cells_order_and_validation():
    pairs = [get_pair("norm"), get_pair("depthwise-conv")]
    cells = plan_cells(pairs, [32, 16, 16], [14, 7])
    assert [(p.name, c, r) for p, c, r in cells] == [
        ("norm", 16, 7),
        ("norm", 16, 14),
        ("norm", 32, 7),
        ("norm", 32, 14),
        ("depthwise-conv", 16, 7),
        ("depthwise-conv", 16, 14),
        ("depthwise-conv", 32, 7),
        ("depthwise-conv", 32, 14),
    ]
    with pytest.raises(ValueError, match="channels must be >= 8"):
        plan_cells(pairs, [4], [7])
    with pytest.raises(ValueError, match="resolutions must be >= 4"):
        plan_cells(pairs, [16], [2])
    with pytest.raises(ValueError, match="no channels"):
        plan_cells(pairs, [], [7])


def test_sweep_cells_rows_and_cap(tmp_path):
    # lowtention has three sides: two comparison rows per cell, each against the first side
    report = _sweep(["lowtention", "depthwise-conv"], channels=(8, 16), resolutions=(4, 6), max_gmacs=None)
    assert len(report.cells) == 2 * 2 * 2 and all(c.ok for c in report.cells)
    rows = report.rows()
    assert len(rows) == 4 * 2 + 4 * 1
    low = [r for r in rows if r["pair"] == "lowtention"]
    assert {(r["side_a"], r["side_b"]) for r in low} == {("lowtention", "mhsa"), ("lowtention", "none")}
    for r in rows:
        assert r["mac_ratio"] == pytest.approx(r["macs_a"] / r["macs_b"])
        assert r["time_ratio_min"] <= r["time_ratio"] <= r["time_ratio_max"]
        assert r["rounds"] == TINY.rounds
        assert r["disagree"] == ({r["cheaper_by_macs"], r["cheaper_by_time"]} == {r["side_a"], r["side_b"]})
    # a MAC cap skips the large cells (and only those) before building anything real
    capped = _sweep(["depthwise-conv"], channels=(8, 64), resolutions=(4,), max_gmacs=9 * 16 * 64 * 64 / 2e9)
    assert [c.status for c in capped.cells] == ["ok", "skipped"]
    assert "over the MAC cap" in capped.cells[1].error
    assert capped.cells[1].sides[1].macs == 9 * 16 * 64 * 64  # still counted


def test_user_pair_registration_and_skip_check():
    pair = ElementPair(
        "test-silu-relu",
        sides=(
            Side("silu", lambda c, r: nn.Sequential(nn.Conv2d(c, c, 1), nn.SiLU())),
            Side("relu", lambda c, r: nn.Sequential(nn.Conv2d(c, c, 1), nn.ReLU())),
        ),
        description="1x1 conv + SiLU vs + ReLU",
        check=lambda c, r: "odd resolution" if r % 2 else None,
    )
    register_pair(pair)
    try:
        report = _sweep(["test-silu-relu"], channels=(8,), resolutions=(4, 5))
        assert [c.status for c in report.cells] == ["ok", "skipped"]
        assert report.cells[1].error == "odd resolution"
        assert report.rows()[0]["mac_ratio"] == 1.0 and report.rows()[0]["cheaper_by_macs"] == "tie"
    finally:
        unregister_pair("test-silu-relu")
    assert "test-silu-relu" not in list_pairs()


# --------------------------------------------------------------------------------------------
# Cache, resume, budget, interruption
# --------------------------------------------------------------------------------------------


def test_resume_from_cache_measures_nothing_new(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = _sweep(["norm", "upsampling"], channels=(8,), resolutions=(4, 6), cache_dir=cache)
    assert all(c.ok and not c.cached for c in first.cells)
    assert len(list(cache.glob("*.json"))) == 4

    measured = []
    monkeypatch.setattr(sweep_mod, "_measure_cell", lambda pair, c, r, *rest: measured.append((pair.name, c, r)))
    second = _sweep(["norm", "upsampling"], channels=(8,), resolutions=(4, 6), cache_dir=cache)
    assert measured == []
    assert all(c.ok and c.cached for c in second.cells)
    assert [c.to_dict()["sides"] for c in second.cells] == [c.to_dict()["sides"] for c in first.cells]
    # anything that changes the measurement changes the key: nothing is reused
    rounds3 = ElementTiming(TINY.warmup, TINY.round, rounds=3)
    for changed in ({"channels_last": True}, {"mode": "throughput", "batch_size": 2}, {"timing": rounds3}):
        measured.clear()
        _sweep(["norm"], channels=(8,), resolutions=(4,), cache_dir=cache, **changed)
        assert measured == [("norm", 8, 4)], changed


def test_fresh_ignores_the_cache(tmp_path, monkeypatch):
    _sweep(["norm"], cache_dir=tmp_path)
    calls = []
    real = sweep_mod._measure_cell
    monkeypatch.setattr(sweep_mod, "_measure_cell", lambda *a: calls.append(1) or real(*a))
    report = _sweep(["norm"], cache_dir=tmp_path, fresh=True)
    assert calls == [1] and not report.cells[0].cached


def test_budget_stop_keeps_partial_results(tmp_path, monkeypatch):
    clock = {"t": 0.0}
    real = sweep_mod._measure_cell

    def measure_and_advance(*args):
        real(*args)
        clock["t"] += 10.0  # every measured cell "takes" 10 s

    monkeypatch.setattr(sweep_mod, "_monotonic", lambda: clock["t"])
    monkeypatch.setattr(sweep_mod, "_measure_cell", measure_and_advance)
    report = _sweep(["depthwise-conv"], channels=(8, 16), resolutions=(4, 6), budget_s=15, cache_dir=tmp_path)
    assert [c.status for c in report.cells] == ["ok", "ok", "not-run", "not-run"]
    assert report.stopped == "budget" and "budget" in report.cells[2].error
    rows = report.rows()
    assert [r["time_ratio"] is not None for r in rows] == [True, True, False, False]
    assert all(r["macs_a"] for r in rows)  # MACs are known for every cell
    # the next run resumes: the two measured cells come from the cache, the other two are measured
    clock["t"] = 0.0
    again = _sweep(["depthwise-conv"], channels=(8, 16), resolutions=(4, 6), budget_s=100, cache_dir=tmp_path)
    assert [c.cached for c in again.cells] == [True, True, False, False]
    assert all(c.ok for c in again.cells) and again.stopped is None


def test_interrupt_keeps_what_was_measured(tmp_path, monkeypatch):
    real = sweep_mod._measure_cell
    calls = []

    def interrupt_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(*args)

    monkeypatch.setattr(sweep_mod, "_measure_cell", interrupt_second)
    report = _sweep(["activation"], channels=(8,), resolutions=(4, 5, 6), cache_dir=tmp_path)
    assert report.stopped == "interrupted"
    assert [c.status for c in report.cells] == ["ok", "not-run", "not-run"]
    assert len(list(tmp_path.glob("*.json"))) == 1


def test_failing_cell_is_recorded_and_not_cached(tmp_path):
    def boom(c, r):
        raise RuntimeError("cannot build this")

    pair = ElementPair(
        "test-broken", sides=(Side("ok", lambda c, r: nn.Identity()), Side("bad", boom)), description="x"
    )
    report = _sweep([pair], cache_dir=tmp_path)
    assert report.cells[0].status == "error" and "cannot build this" in report.cells[0].error
    assert not list(tmp_path.glob("*.json"))


# --------------------------------------------------------------------------------------------
# Output files and the report
# --------------------------------------------------------------------------------------------


def _assert_real_png(path, min_bytes=5000):
    import matplotlib.image

    assert path.exists() and path.stat().st_size > min_bytes, path
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 300
    colours = np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)
    assert len(colours) > 50, f"{path} looks blank ({len(colours)} colours)"


def test_csv_json_heatmaps_and_report(tmp_path):
    report = _sweep(["fused-mbconv", "lowtention"], channels=(8, 16), resolutions=(4, 6))
    csv_path = report.write_csv(tmp_path / "elements-latency.csv")
    json_path = report.write_json(tmp_path / "elements-latency.json")
    with open(csv_path) as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ROW_COLUMNS
    required = ["pair", "channels", "resolution", "macs_a", "macs_b", "mac_ratio", "time_ratio"]
    assert set(required) <= set(reader.fieldnames)
    assert len(rows) == 4 * 1 + 4 * 2
    fused = [r for r in rows if r["pair"] == "fused-mbconv"]
    assert all(int(r["macs_a"]) == 40 * int(r["resolution"]) ** 2 * int(r["channels"]) ** 2 for r in fused)
    assert all(float(r["mac_ratio"]) > 1 and float(r["time_ratio"]) > 0 for r in fused)
    data = json.loads(json_path.read_text())
    assert data["schema"] == "lowformer.analyze.elements/1"
    assert data["environment"]["torch"] == torch.__version__ and data["settings"]["device"] == "cpu"
    assert len(data["cells"]) == 8 and len(element_rows(data)) == 12
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temporary left behind

    pngs = plot_element_heatmaps(report.to_dict(), tmp_path, stem="elements-latency")
    assert [p.name for p in pngs] == ["elements-latency_fused-mbconv.png", "elements-latency_lowtention.png"]
    for p in pngs:
        _assert_real_png(p)
    md = write_report(tmp_path).read_text()
    assert "## Design elements: latency, batch 1" in md
    assert "(elements-latency_fused-mbconv.png)" in md and "(elements-latency_lowtention.png)" in md
    assert "**lowtention vs mhsa**" in md and "**lowtention vs none**" in md
    assert "| channels \\ px | 4 | 6 |" in md


def test_heatmap_marks_unmeasured_cells(tmp_path):
    report = _sweep(["depthwise-conv"], channels=(8, 64), resolutions=(4, 8), max_gmacs=4e-5)
    assert [c.status for c in report.cells] == ["ok", "ok", "skipped", "skipped"]
    (png,) = plot_element_heatmaps(report.to_dict(), tmp_path)
    _assert_real_png(png)
    assert "skip" in format_elements(report.to_dict())


def test_table_shows_ratios():
    report = _sweep(["upsampling"], channels=(8,), resolutions=(4,))
    text = format_elements(report.to_dict())
    assert "upsampling: transposed vs interpolate" in text and "upsampling: transposed vs pixelshuffle" in text
    assert "/4.00" in text and "/1.00" in text  # MAC ratios 4 (interpolation is a quarter) and 1


# --------------------------------------------------------------------------------------------
# Operator profile and model sets
# --------------------------------------------------------------------------------------------


def test_classify_op():
    assert classify_op("aten::conv2d", [[1, 32, 8, 8], [32, 1, 3, 3]]) == "depthwise_conv"
    assert classify_op("aten::conv2d", [[1, 32, 8, 8], [64, 32, 1, 1]]) == "dense_conv"
    assert classify_op("aten::conv2d", [[1, 1, 8, 8], [8, 1, 3, 3]]) == "dense_conv"  # one input channel
    assert classify_op("aten::conv_transpose2d", [[1, 8, 4, 4], [8, 8, 2, 2]]) == "transposed_conv"
    assert classify_op("aten::convolution", [[1, 8, 4, 4], [8, 8, 2, 2]], transposed=True) == "transposed_conv"
    assert classify_op("aten::scaled_dot_product_attention") == "attention"
    assert classify_op("aten::linear") == "linear"
    assert classify_op("aten::group_norm") == "norm" and classify_op("aten::batch_norm") == "norm"
    assert classify_op("aten::hardswish") == "activation" and classify_op("aten::gelu") == "activation"
    assert classify_op("aten::permute") == "reshape_copy" and classify_op("aten::contiguous") == "reshape_copy"
    assert classify_op("aten::add") == "other" and classify_op("aten::mean") == "other"


class _Tiny(nn.Module):
    """Every operator kind once: dense, depthwise and transposed conv, norm, activation, attention."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.norm = nn.GroupNorm(1, 16)
        self.act = nn.Hardswish()
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.act(self.norm(self.dw(self.stem(x))))
        t = x.flatten(2).transpose(1, 2).reshape(x.shape[0], 1, -1, 16)  # (B, 1 head, tokens, 16)
        x = torch.nn.functional.scaled_dot_product_attention(t, t, t).reshape(x.shape)
        return self.fc(self.up(x).mean((2, 3)))


def test_profile_model_shares(tmp_path):
    profile = profile_model(
        _Tiny(), device="cpu", image_size=32, iters=2, timing=TimingPolicy(1, 0.0, 2, 0.0), label="tiny", threads=1
    )
    data = profile.to_dict()
    kinds = {k["kind"]: k for k in data["kinds"]}
    for kind in ("dense_conv", "depthwise_conv", "transposed_conv", "linear", "attention", "norm", "activation"):
        assert kinds[kind]["ops"] >= 1 and kinds[kind]["time_ms"] > 0, kind
    assert sum(k["time_share"] for k in data["kinds"]) == pytest.approx(1.0)
    assert sum(k["mac_share"] for k in data["kinds"]) == pytest.approx(1.0)
    assert kinds["depthwise_conv"]["macs"] == 32 * 32 * 16 * 9
    assert kinds["transposed_conv"]["macs"] == 32 * 32 * 16 * 8 * 4
    assert kinds["attention"]["macs"] == 2 * 1024 * 1024 * 16
    assert kinds["norm"]["macs"] == 0 and data["macs"] == sum(k["macs"] for k in data["kinds"])
    assert profile.write_json(tmp_path / "profile-tiny-latency.json").exists()
    png = plot_profile(data, tmp_path / "profile-tiny-latency.png")
    _assert_real_png(png, min_bytes=3000)
    md = write_report(tmp_path).read_text()
    assert "## Operator profile: `tiny`" in md and "(profile-tiny-latency.png)" in md
    assert "depthwise conv" in format_profile(data)


def _tiny_net(width: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1))


def test_models_ranks_correlations_and_budget(tmp_path, monkeypatch):
    models = [(f"net{w}", _tiny_net(w)) for w in (4, 8, 16)]
    timing = TimingPolicy(warmup_iters=1, warmup_s=0.0, min_iters=2, min_s=0.0)
    report = analyze_models(models, device="cpu", batch_size=2, image_size=32, timing=timing, threads=1)
    data = report.to_dict()
    assert data["schema"] == "lowformer.analyze.models/1"
    assert [r["model"] for r in data["ranks"]] == ["net4", "net8", "net16"]  # sorted by MACs
    assert [r["rank_macs"] for r in data["ranks"]] == [1, 2, 3]
    assert {c["mode"] for c in data["bench"]["correlations"]} == {"throughput", "latency"}
    for c in data["bench"]["correlations"]:
        assert -1 <= c["spearman_macs_latency"] <= 1 and -1 <= c["kendall_macs_latency"] <= 1
    report.write_json(tmp_path / "models.json")
    _assert_real_png(plot_models(report, tmp_path / "models.png"))
    md = write_report(tmp_path).read_text()
    assert "## Models: MACs vs latency and throughput" in md and "Spearman rho" in md

    clock = iter([0.0] + [100.0] * 50)
    monkeypatch.setattr("lowformer.analyze.models._monotonic", lambda: next(clock))
    stopped = analyze_models(models, device="cpu", batch_size=2, image_size=32, timing=timing, budget_s=50)
    assert stopped.stopped == "budget" and len(stopped.not_run) == 6 and not stopped.bench.results


# --------------------------------------------------------------------------------------------
# Command line (in process: argparse errors exit 2, library ValueErrors are printed and give 2)
# --------------------------------------------------------------------------------------------


def test_cli_list(capsys):
    assert main(["analyze", "--list"]) == 0
    out = capsys.readouterr().out
    for name in BUILTIN:
        assert name in out
    assert "a: fused" in out and "c: none" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["analyze", "elements", "fused-mbcov"], "Did you mean fused-mbconv"),
        (["analyze", "elements", "--channels", "abc"], "argument --channels: not an integer: 'abc'"),
        (["analyze", "elements", "--channels", "4"], "argument --channels: must be >= 8, got 4"),
        (["analyze", "elements", "--resolutions", "2"], "argument --resolutions: must be >= 4, got 2"),
        (["analyze", "elements", "--rounds", "1"], "argument --rounds: must be >= 2, got 1"),
        (["analyze", "elements", "--budget", "-1"], "argument --budget: must be >= 0, got -1"),
        (["analyze", "elements", "--batch-size", "8"], "(--batch-size) applies to throughput mode"),
        (["analyze", "elements", "--mode", "fast"], "invalid choice"),
        (["analyze", "elements", "--max-gmacs", "0"], "must be > 0"),
        (["analyze", "elements", "--import", "no_such_module_xyz"], "--import no_such_module_xyz"),
        (["analyze", "elements", "--device", "tpu"], "unknown device"),
        (["analyze", "model", "lowformr_b1"], "Did you mean lowformer_b1"),
        (["analyze", "model", "lowformer_b1", "--batch-size", "4"], "latency mode is batch 1 by definition"),
        (["analyze", "model", "edgevit_xxs", "--image-size", "200"], "multiples of 32, got 200x200 (e.g. 224x224)"),
        (["analyze", "models", "--image-size", "4"], "image size 4x4 is too small for lowformer_b0"),
    ],
)
def test_cli_errors_exit_2_with_a_message(args, message, capsys):
    try:
        code = main(args)
    except SystemExit as e:  # argparse
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_cli_elements_run_resume_and_report(tmp_path, capsys):
    args = ["analyze", "elements", "activation", "depthwise-conv", "--quick", "--channels", "8", "--resolutions"]
    args += ["4", "6", "--rounds", "2", "--threads", "1", "--out", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "activation: hardswish vs gelu" in out and "4 measured, 0 from the cache" in out
    for name in ("elements-latency.csv", "elements-latency.json", "report.md", "elements-latency_activation.png"):
        assert (tmp_path / name).exists(), name
    assert main(args) == 0  # resumes entirely from the cache in OUT/cache
    assert "0 measured, 4 from the cache" in capsys.readouterr().out
    md = (tmp_path / "report.md").read_text()
    assert md.count("## Design elements") == 1 and "![activation heatmaps]" in md


def test_cli_ctrl_c_keeps_the_measured_cells_and_exits_130(tmp_path, monkeypatch, capsys):
    real, calls = sweep_mod._measure_cell, []

    def interrupt_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(*args)

    monkeypatch.setattr(sweep_mod, "_measure_cell", interrupt_second)
    args = ["analyze", "elements", "activation", "--quick", "--channels", "8", "--resolutions", "4", "5", "6"]
    assert main([*args, "--rounds", "2", "--threads", "1", "--out", str(tmp_path), "--no-progress"]) == 130
    captured = capsys.readouterr()
    assert captured.err == "lowformer analyze: interrupted\n"
    assert "interrupted: run the same command to resume" in captured.out
    data = json.loads((tmp_path / "elements-latency.json").read_text())
    assert data["stopped"] == "interrupted" and [c["status"] for c in data["cells"]] == ["ok", "not-run", "not-run"]
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1
    assert (tmp_path / "report.md").exists() and (tmp_path / "elements-latency_activation.png").exists()


def test_cli_failed_cell_exits_1(tmp_path, monkeypatch, capsys):
    def broken(*args):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(sweep_mod, "_measure_cell", broken)
    args = ["analyze", "elements", "activation", "--quick", "--channels", "8", "--resolutions", "4"]
    assert main([*args, "--out", str(tmp_path), "--no-cache", "--no-progress"]) == 1
    assert capsys.readouterr().err == "lowformer analyze: error: 1 of 1 cell(s) failed (see the table above)\n"
    assert json.loads((tmp_path / "elements-latency.json").read_text())["cells"][0]["status"] == "error"


@pytest.mark.parametrize("where", ["out-is-a-file", "json-is-a-folder", "model-out-is-a-file"])
def test_cli_unwritable_output_fails_before_the_run(where, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["analyze", "elements", "activation", "--quick", "--out", str(out)]
    if where == "out-is-a-file":
        out.write_text("not a folder")
        message = f"cannot write {out}: it is a file, not a folder"
    elif where == "json-is-a-folder":
        (out / "elements-latency.json").mkdir(parents=True)
        message = f"cannot write {out / 'elements-latency.json'}: it is a folder; give a file name"
    else:
        out.write_text("not a folder")
        args = ["analyze", "model", "lowformer_b0", "--out", str(out)]
        message = f"cannot write {out}: it is a file, not a folder"
    assert main(args) == 1
    captured = capsys.readouterr()
    assert captured.err == f"lowformer analyze: error: {message}\n" and captured.out == ""
    assert not list(tmp_path.rglob("*.csv")) and not list(tmp_path.rglob("*.png"))


def test_cli_timm_models_in_model_and_models(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--image-size", "32", "--threads", "1", "--out", str(out)]
    assert main(["analyze", "model", "timm:test_resnet", "--iters", "1", "--quick", "--no-roofline", *args]) == 0
    profile = json.loads((out / "profile-timm_test_resnet-latency.json").read_text())
    assert (profile["model"], profile["source"]) == ("timm:test_resnet", "timm") and profile["macs"] > 0
    args += ["--no-progress", "--no-predict"]  # the calibration and the roofline: test_analyze_roofline.py
    assert main(["analyze", "models", "timm:test_resnet", "--quick", "--batch-size", "2", *args]) == 0
    models = json.loads((out / "models.json").read_text())
    assert [(r["model"], r["source"]) for r in models["ranks"]] == [("timm:test_resnet", "timm")]
    assert {r["status"] for r in models["bench"]["results"]} == {"ok"}
    md = (out / "report.md").read_text()
    assert "## Operator profile: `timm:test_resnet`" in md and "## Models: MACs vs latency" in md
    assert "timm:test_resnet" in capsys.readouterr().out


def test_cli_user_pair_via_import(tmp_path, capsys):
    plugin = tmp_path / "my_pairs.py"
    plugin.write_text(
        "from torch import nn\n"
        "from lowformer.analyze import ElementPair, Side, register_pair\n"
        "register_pair(ElementPair('test-plugin', sides=(Side('silu', lambda c, r: nn.SiLU()),\n"
        "    Side('relu', lambda c, r: nn.ReLU())), description='SiLU vs ReLU'), replace=True)\n"
    )
    try:
        assert main(["analyze", "elements", "--import", str(plugin), "--list"]) == 0
        assert "test-plugin" in capsys.readouterr().out
        args = ["analyze", "elements", "test-plugin", "--import", str(plugin), "--quick", "--channels", "8"]
        assert main([*args, "--resolutions", "4", "--out", str(tmp_path / "out"), "--no-cache"]) == 0
        assert "test-plugin: silu vs relu" in capsys.readouterr().out
    finally:
        unregister_pair("test-plugin")


def test_ratio_formatting():
    from lowformer.report.tables import format_ratio

    assert [format_ratio(v) for v in (0.0016, 0.5, 1.0, 4.0, 12.34, 512.0)] == [
        "0.0016",
        "0.50",
        "1.00",
        "4.00",
        "12.3",
        "512",
    ]
    assert format_ratio(None) == "-" and format_ratio(math.inf) == "-"

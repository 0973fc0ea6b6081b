"""The benchmark scripts' own arithmetic (the scripts live outside the package, in benchmarks/)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from lowformer.analyze.models import model_set

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _entry(run: str, batch: int, logs_by_model: dict[str, dict[str, float]]) -> dict:
    """A rejudged entry whose latency models erred by exp(log) - 1 on each judged model."""
    entry = {"run": run, "mode": "latency", "batch_size": batch}
    for name, logs in logs_by_model.items():
        entry[name] = {"spearman": 1.0, "errors": {m: math.expm1(x) for m, x in logs.items()}}
    return entry


def test_rejudge_bias_splits_the_error_into_bias_and_spreads():
    rejudge = _script("latency_model_rejudge")
    same = {"A": 0.1, "B": 0.0, "C": -0.1}  # the run's median is B: A +0.1, C -0.1
    entries = [
        _entry("r1", 1, {"m1": same, "m2": same}),
        _entry("r2", 1, {"m1": {"A": 0.3, "B": 0.1, "C": -0.2}, "m2": same}),  # m1: A +0.2, C -0.3
        _entry("r1", 16, {"m1": {"A": 5.0, "B": 0.0, "C": 0.0}, "m2": same}),  # another batch size: ignored
    ]
    rows = {r["model"]: r for r in rejudge.bias(entries, ["m1", "m2"], batch=1)}
    a, b, c = rows["A"], rows["B"], rows["C"]
    # A: m1's mean over runs (0.1 + 0.2) / 2 = 0.15 with a spread of 0.05; m2's 0.1, spread 0
    assert a["bias"] == pytest.approx(0.125)
    assert a["across_models"] == pytest.approx(0.025)
    assert a["across_runs"] == pytest.approx(0.025)
    assert a["runs"] == 2
    assert b["bias"] == pytest.approx(0.0) and b["across_models"] == pytest.approx(0.0)
    # C: m1 -0.1 and -0.3 (mean -0.2, spread 0.1), m2 -0.1 twice
    assert c["bias"] == pytest.approx(-0.15) and c["across_runs"] == pytest.approx(0.05)
    assert [r["model"] for r in rejudge.bias(entries, ["m1", "m2"], batch=1)] == ["C", "B", "A"]  # by bias
    assert rejudge.bias(entries, ["m1"], batch=1)[0]["across_models"] is None  # one latency model: no spread

    md = rejudge.bias_markdown(entries, ["m1", "m2"], "cmd")
    assert "## Batch 1" in md and "## Batch 16" in md
    batch1, batch16 = md.split("## Batch 16")
    assert "| A | 2 |" in batch1
    assert "| A | 1 | +2.55 | 2.45 | - |" in batch16  # m1 +5.0, m2 +0.1; one run: no spread across runs
    assert "spread across latency models -," in rejudge.bias_markdown(entries, ["m1"], "cmd")  # one: none


def _stored_run(tmp_path):
    """A stored `analyze models` run of two timm test models at batch 1, 32 px: (its folder, its results)."""
    run = tmp_path / "run"
    run.mkdir()
    results = [
        {"model": m, "mode": "latency", "batch_size": 1, "status": "ok", "latency_ms_p50": t, "macs": macs,
         "image_height": 32, "image_width": 32}
        for m, t, macs in [("timm:test_resnet", 2.0, 3), ("timm:test_efficientnet", 1.0, 2)]
    ]  # fmt: skip
    (run / "models.json").write_text(json.dumps({"bench": {"results": results}}))
    return run, results


def test_rejudge_refit_judges_a_sweep_refitted_with_this_fit(tmp_path):
    """`--refit` adds NAME-refit, the model's own samples fitted again, judged on the same stored run."""
    from lowformer.analyze.latency import Sample, fit_latency_model
    from lowformer.measure.calibrate import Ceilings

    rejudge = _script("latency_model_rejudge")
    ceilings = Ceilings("cpu", "test cpu", "fp32", 2, "wall", "0", 100e9, 10e9, 2e-6)
    samples = [
        Sample(kind, "x", 8, 8, 1, int(f), int(b), 2e-6 + f / 50e9 + b / 5e9, 1e-6 + f / 60e9 + b / 8e9, int(b / 3))
        for kind in ("conv_1x1", "elementwise")
        for f, b in [(1e5, 1e5), (1e7, 1e6), (1e9, 1e7), (1e6, 1e7), (1e8, 1e8)]
    ]
    stored = fit_latency_model(samples, ceilings)
    stored.factors["conv_1x1"].compute_efficiency *= 2  # an older fit: not what this version fits
    (tmp_path / "lm.json").write_text(json.dumps(stored.to_dict()))
    run, results = _stored_run(tmp_path)
    rejudge.main(
        ["--runs", str(run), "--models", f"old={tmp_path / 'lm.json'}", "--refit", "--out", str(tmp_path / "o")]
    )
    (entry,) = json.loads((tmp_path / "o" / "rejudged.json").read_text())["entries"]
    assert {"old", "old-refit"} <= set(entry)
    refit = fit_latency_model(samples, ceilings)
    errors = entry["old-refit"]["errors"]
    assert errors != entry["old"]["errors"]
    measured = {r["model"]: r["latency_ms_p50"] for r in results}
    for name, error in errors.items():  # the refit predicts what fitting the samples now predicts
        predicted = rejudge.predict_costs(rejudge._costs(name, 1, (32, 32), {}), refit)["predicted_ms"]
        assert error == pytest.approx(predicted / measured[name] - 1)


def test_rejudge_without_layout_drops_the_layout_kinds_only(tmp_path):
    """`--without-layout` adds NAME-nolayout for a model with the layout kinds of sweep version 7 (those
    calls then at the factors of the kind they were split off) and for no other model; a network
    without such calls is predicted the same by both."""
    from lowformer.analyze.latency import KindFactors, LatencyModel
    from lowformer.measure.calibrate import Ceilings

    rejudge = _script("latency_model_rejudge")
    ceilings = Ceilings("cpu", "test cpu", "fp32", 2, "wall", "0", 100e9, 10e9, 2e-6)
    kinds = ("conv_kxk", "conv_1x1", "batch_norm", "activation", "elementwise", "depthwise_conv")
    factors = {k: KindFactors(0.5, 0.5, 1.0) for k in kinds}
    old = LatencyModel(ceilings, factors, sweep_version=6)
    new = LatencyModel(ceilings, {**factors, "depthwise_conv_strided": KindFactors(0.01, 0.01, 50.0)})
    for name, model in (("old", old), ("new", new)):
        (tmp_path / f"{name}.json").write_text(json.dumps(model.to_dict()))
    run, _ = _stored_run(tmp_path)
    models = [f"old={tmp_path / 'old.json'}", f"new={tmp_path / 'new.json'}"]
    rejudge.main(["--runs", str(run), "--models", *models, "--without-layout", "--out", str(tmp_path / "o")])
    (entry,) = json.loads((tmp_path / "o" / "rejudged.json").read_text())["entries"]
    assert {"old", "new", "new-nolayout"} <= set(entry) and "old-nolayout" not in entry
    assert entry["new-nolayout"]["errors"] == entry["new"]["errors"] == entry["old"]["errors"]


def test_rejudge_without_kind_drops_that_kind_only(tmp_path, capsys):
    """`--without-kind KIND` adds NAME-no-KIND for a model that has the kind, whose calls then take the
    factors of the kind it was split off (`KIND,KIND`: both dropped in one variant); a kind that is not
    split off is a usage error."""
    from lowformer.analyze.latency import KindFactors, LatencyModel
    from lowformer.measure.calibrate import Ceilings

    rejudge = _script("latency_model_rejudge")
    ceilings = Ceilings("cpu", "test cpu", "fp32", 2, "wall", "0", 100e9, 10e9, 2e-6)
    kinds = ("conv_kxk", "conv_1x1", "batch_norm", "activation", "elementwise", "depthwise_conv", "sdpa")
    factors = {k: KindFactors(0.5, 0.5, 1.0) for k in kinds}
    model = LatencyModel(ceilings, {**factors, "sdpa_strided": KindFactors(0.01, 0.01, 50.0)})
    (tmp_path / "m.json").write_text(json.dumps(model.to_dict()))
    run, _ = _stored_run(tmp_path)
    args = ["--runs", str(run), "--models", f"m={tmp_path / 'm.json'}", "--out", str(tmp_path / "o")]
    drop = ["--without-kind", "sdpa_strided", "--without-kind", "depthwise_conv_strided"]
    rejudge.main([*args, *drop, "--without-kind", "sdpa_strided,depthwise_conv_strided"])
    (entry,) = json.loads((tmp_path / "o" / "rejudged.json").read_text())["entries"]
    assert {"m", "m-no-sdpa_strided", "m-no-sdpa_strided+depthwise_conv_strided"} <= set(entry)
    assert "m-no-depthwise_conv_strided" not in entry
    assert entry["m-no-sdpa_strided"]["errors"] == entry["m"]["errors"]  # no strided attention in these
    with pytest.raises(SystemExit) as raised:
        rejudge.main([*args, "--without-kind", "sdpa_strided,conv_1x1"])
    assert raised.value.code == 2 and "conv_1x1 is not a split-off kind" in capsys.readouterr().err


class _NormsKeepChannelsLast(torch.nn.Module):
    """A layer norm on a permuted image and a group norm, which keep the image channels-last on the CPU,
    with a conv after each."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.ln, self.gn = torch.nn.Conv2d(3, 4, 1), torch.nn.LayerNorm(4), torch.nn.GroupNorm(1, 4)
        self.conv1, self.conv2 = torch.nn.Conv2d(4, 4, 1), torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        x = self.ln(self.stem(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.conv2(self.gn(self.conv1(x)))


def test_meta_layouts_finds_the_meta_kernels_the_walk_corrects(monkeypatch, tmp_path):
    """Without the walk's correction the meta kernels of convolution and group norm write NCHW where the
    CPU's keep a channels-last input's layout; with it, no call differs."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the script imports its sibling _record
    script = _script("meta_layouts")
    model = _NormsKeepChannelsLast().eval()
    found = script.meta_layouts([model], 2, corrected=False)["operators"]
    assert set(found) == {"aten.convolution.default", "aten.native_group_norm.default"}
    assert found["aten.convolution.default"]["calls"] == 2  # the two after the norms, not the stem
    assert found["aten.convolution.default"]["example"]["cpu_strides"] == [4 * 224 * 224, 1, 4 * 224, 4]
    corrected = script.meta_layouts([model], 2, corrected=True)
    assert corrected["operators"] == {} and corrected["calls"] >= 5
    script.main(["timm:test_resnet", "--out", str(tmp_path)])
    assert "laid out as on the CPU" in (tmp_path / "meta-layouts.md").read_text()


def test_benchmark_model_arguments(monkeypatch, capsys):
    """The benchmarks that run on models take names or repeatable --set, never both or neither; an unknown
    set is a usage error (exit 2) that names the sets."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    helper = _script("_models_arg")
    p = argparse.ArgumentParser()
    helper.add_model_arguments(p)
    assert helper.model_names(p, p.parse_args(["a", "timm:b"])) == ["a", "timm:b"]
    both = helper.model_names(p, p.parse_args(["--set", "isomacs24", "--set", "isomacs24-large"]))
    assert both == [*model_set("isomacs24"), *model_set("isomacs24-large")] and len(both) == 48
    for argv, message in [
        ([], "not both"),
        (["a", "--set", "isomacs24"], "not both"),
        (["--set", "nope"], "isomacs24"),
    ]:
        with pytest.raises(SystemExit) as stop:
            helper.model_names(p, p.parse_args(argv))
        assert stop.value.code == 2 and message in capsys.readouterr().err

"""The latency model refined on design-element sweeps: per-kind scales recovered from sweeps whose
times are made with known scales, a real `analyze elements` result read back, the scaled model saved
and printed, and sweeps measured under other settings refused."""

from __future__ import annotations

import json
import re

import pytest

from lowformer.analyze import element_fit, latency
from lowformer.analyze.element_fit import (
    ELEMENTS_SCHEMA,
    element_samples,
    read_element_results,
    refine_latency_model,
)
from lowformer.analyze.latency import KindFactors, LatencyModel
from lowformer.analyze.opkinds import FIT_KINDS
from lowformer.analyze.predict import model_summary
from lowformer.cli import main
from lowformer.errors import LowformerRuntimeError
from lowformer.measure import calibrate as cal
from lowformer.measure.calibrate import Ceilings
from lowformer.report import format_calibration

PAIRS = ("activation", "depthwise-conv", "norm", "fused-mbconv", "upsampling")
CELLS = ((16, 14), (32, 7), (32, 28), (64, 14), (128, 7))
TRUE_SCALES = {"conv_1x1": 1.6, "conv_kxk": 0.7, "depthwise_conv": 2.5}


@pytest.fixture(autouse=True)
def _calibration_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(cal.CALIBRATION_ENV, str(tmp_path / "user-cache"))


def _ceilings(**overrides) -> Ceilings:
    fields = dict(device="cpu", device_name="test cpu", precision="fp32", threads=1, clock="wall", torch="x",
                  flops_per_s=100e9, bytes_per_s=10e9, overhead_s=2e-6)  # fmt: skip
    return Ceilings(**{**fields, **overrides})


def _model(**overrides) -> LatencyModel:
    """Round factors: every kind at half the ceilings and 3 overheads a call."""
    factors = {kind: KindFactors(0.5, 0.5, 3.0, samples=10) for kind in FIT_KINDS}
    return LatencyModel(_ceilings(**overrides), factors, {"batch_sizes": [1, 16]})


def _sweep(batch_size: int, time_ms=lambda pair, side, c, r: 1.0, **settings) -> dict:
    """An `analyze elements` result of the built-in PAIRS at CELLS, with the times `time_ms` gives."""
    from lowformer.analyze.elements import get_pair

    cells = []
    for name in PAIRS:
        for c, r in CELLS:
            sides = [{"label": s.label, "time_ms_p50": time_ms(name, s.label, c, r)} for s in get_pair(name).sides]
            cells.append({"pair": name, "channels": c, "resolution": r, "status": "ok", "sides": sides})
    cells.append({"pair": "activation", "channels": 999, "resolution": 9, "status": "skipped", "sides": []})
    base = {"device": "cpu", "precision": "fp32", "threads": 1, "backend": "eager", "channels_last": False}
    return {
        "schema": ELEMENTS_SCHEMA,
        "environment": {"date": "2026-12-01T12:00:00+00:00"},
        "settings": {**base, "batch_size": batch_size, **settings},
        "cells": cells,
    }


def _write(path, data):
    path.write_text(json.dumps(data))
    return path


def _with_true_scales(tmp_path, model) -> list:
    """Sweeps at batch 1 and 16 whose times are the operator fit's per-kind times, scaled by TRUE_SCALES."""
    paths = []
    for b in (1, 16):
        results = [(tmp_path / "probe.json", _sweep(b))]
        predicted = {
            (s.pair, s.side, s.channels, s.resolution): s.predicted_s for s in element_samples(results, model)[0]
        }

        def time_ms(pair, side, c, r, predicted=predicted):
            per_kind = predicted[(pair, side, c, r)]
            return 1e3 * sum(t * TRUE_SCALES.get(kind, 1.0) for kind, t in per_kind.items())

        paths.append(_write(tmp_path / f"elements-b{b}.json", _sweep(b, time_ms)))
    return paths


def test_scales_recover_known_ones_and_the_model_uses_them(tmp_path):
    model = _model()
    refined, summary = refine_latency_model(model, _with_true_scales(tmp_path, model))
    for kind, scale in TRUE_SCALES.items():
        assert refined.factors[kind].element_scale == pytest.approx(scale, rel=0.05), kind
    assert refined.factors["batch_norm"].element_scale == pytest.approx(1.0, rel=0.05)  # present, unscaled
    assert refined.factors["softmax"].element_scale == 1.0  # not in any element: left alone
    assert summary["median_abs_error_before"] > 0.1 and summary["median_abs_error_after"] < 0.02
    assert summary["batch_sizes"] == [1, 16] and summary["sides"] == 2 * len(CELLS) * 13
    # the prediction is the operator fit's times the scale, for every part of a call
    base = model.op_time_s("conv_1x1", 1e9, 1e7)
    assert refined.op_time_s("conv_1x1", 1e9, 1e7) == pytest.approx([1.6 * t for t in base], rel=0.05)
    # refining a refined model starts again from the operator fit
    again, _ = refine_latency_model(refined, _with_true_scales(tmp_path, model))
    assert again.factors["conv_1x1"].element_scale == pytest.approx(1.6, rel=0.05)


def test_refined_model_round_trips_and_prints(tmp_path):
    model = _model()
    _with_true_scales(tmp_path, model)
    refined, _ = refine_latency_model(model, [tmp_path])  # a folder: its elements-*.json
    assert [p.rsplit("/", 1)[-1] for p in refined.settings["elements"]["files"]] == [
        "elements-b1.json",
        "elements-b16.json",
    ]
    back = LatencyModel.from_dict(json.loads(json.dumps(refined.to_dict())))
    assert back.factors == refined.factors and back.settings["elements"]["pairs"] == sorted(PAIRS)
    text = format_calibration(refined.ceilings.to_dict(), refined.to_dict())
    assert "element scale" in text and re.search(r"^1x1 conv .* 10 .*1\.(59|60|61)$", text, re.M)
    assert "refined on 130 measured sides of design-element sweeps" in text
    assert "element scale" not in format_calibration(model.ceilings.to_dict(), model.to_dict())
    summary = model_summary(refined)  # what predictions record: no samples of either fit
    assert "samples" not in summary and summary["settings"]["elements"]["samples"] == []
    assert summary["factors"]["conv_1x1"]["element_scale"] == refined.factors["conv_1x1"].element_scale


@pytest.mark.parametrize(
    "settings, overrides, message",
    [
        ({"threads": 2}, {}, "threads 2 (calibration: 1)"),
        ({"precision": "fp16"}, {}, "precision 'fp16'"),
        ({"backend": "compile"}, {}, "backend 'compile'"),
        ({}, {"clock": "cpu"}, "element sweeps time the wall clock"),
        ({}, {"memory": "keep"}, "default allocator"),
    ],
)
def test_a_sweep_measured_otherwise_is_refused(tmp_path, settings, overrides, message):
    path = _write(tmp_path / "elements-latency.json", _sweep(1, **settings))
    with pytest.raises(ValueError, match="measured under other settings") as e:
        refine_latency_model(_model(**overrides), [path])
    assert message in str(e.value)


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        read_element_results([tmp_path / "missing.json"])
    with pytest.raises(FileNotFoundError, match="no elements-\\*.json in this folder"):
        read_element_results([tmp_path])
    with pytest.raises(LowformerRuntimeError, match="not an `analyze elements` result"):
        read_element_results([_write(tmp_path / "x.json", {"schema": "something else"})])
    with pytest.raises(LowformerRuntimeError, match="not readable"):
        (tmp_path / "y.json").write_text("{ half a file")
        read_element_results([tmp_path / "y.json"])


def test_an_unregistered_pair_is_left_out_with_a_note(tmp_path):
    data = _sweep(1)
    data["cells"][0]["pair"] = "my-own-pair"
    calls = []
    samples, notes = element_samples([(tmp_path / "e.json", data)], _model(), lambda *a: calls.append(a))
    assert calls[0] == (0, len(CELLS) * len(PAIRS)) and calls[-1] == (len(CELLS) * len(PAIRS),) * 2  # ok cells only
    assert len(samples) == 13 * len(CELLS) - 3  # the first cell's 3 sides are left out
    assert notes == ["e.json: pair 'my-own-pair' is not registered here (pass its --import); left out"]


def test_a_real_sweep_is_read_back(tmp_path, capsys):
    """`analyze elements` as a user runs it, then the refinement on its result file."""
    out = tmp_path / "sweep"
    args = ["analyze", "elements", "activation", "--quick", "--threads", "1", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    capsys.readouterr()
    refined, summary = refine_latency_model(_model(), [out])
    assert summary["pairs"] == ["activation"] and summary["sides"] == 3 * 4  # 2 x 2 quick cells
    assert {"conv_1x1", "activation", "activation_exp"} >= set(summary["scales"])
    assert all(0.1 <= s <= 10 for s in summary["scales"].values())


def test_cli_calibrate_with_elements(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "calibration"
    model = _model()
    ceilings = Ceilings.from_dict({**model.ceilings.to_dict(), "details": {"quick": True}})
    cal.write_json(cal.calibration_path("cpu", "fp32", 1, "wall", True, folder), ceilings.to_dict())
    cache = latency.latency_model_path(ceilings, folder)
    cal.write_json(cache, LatencyModel(ceilings, model.factors, model.settings).to_dict())
    monkeypatch.setattr(cal, "calibrate", lambda *a, **k: pytest.fail("the cached calibration must be used"))
    paths = _with_true_scales(tmp_path, model)
    base = ["analyze", "calibrate", "--quick", "--threads", "1", "--calibration-dir", str(folder)]
    assert main([*base, "--elements", *map(str, paths), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "refining on the element sweeps of" in printed and "element scale" in printed
    cached = LatencyModel.from_dict(json.loads(cache.read_text()))
    assert cached.factors["conv_1x1"].element_scale == pytest.approx(1.6, rel=0.05)  # later commands use it
    assert "design-element sweeps" in (tmp_path / "out" / "report.md").read_text()

    assert main([*base, "--elements", str(tmp_path / "nope.json")]) == 2  # said before any measuring
    assert "no such file or folder" in capsys.readouterr().err
    paths[0].write_text(json.dumps(_sweep(1, threads=2)))
    assert main([*base, "--elements", str(paths[0])]) == 2
    assert "threads 2 (calibration: 1)" in capsys.readouterr().err


def test_fit_needs_samples():
    with pytest.raises(ValueError, match="no measured element sides"):
        element_fit.fit_element_scales([])

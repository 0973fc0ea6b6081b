"""`lowformer.tune` and deployed packages: candidates, skipping with a reason, verification against the
fp32 eager model, the winner, the package record, `load_deployed`, and the `lowformer tune` command.

Tuning runs eager candidates on tiny models at 32-64 px with one thread; ONNX Runtime and
AOTInductor are built once each, on a small conv net (AOTInductor compiles: tens of seconds).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import randomize_bn, run_unprivileged
from torch import nn

import lowformer
from lowformer.bench import backends
from lowformer.cli import main
from lowformer.errors import LowformerRuntimeError, VerificationError
from lowformer.tuning import (
    CandidateResult,
    Option,
    candidate_options,
    check_package,
    load_deployed,
    read_record,
    require_best,
    save_tuned,
    skip_reason,
    tune,
)
from lowformer.tuning import tuner as tuner_module
from lowformer.tuning.tuner import score


class SmallNet(nn.Module):
    """Conv-BN-act, a second conv, pooling and a classifier: BatchNorm folding and packing apply."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def small_net() -> nn.Module:
    model = SmallNet().eval()
    randomize_bn(model)
    return model


def _tune(model, x, candidates, **kwargs):
    lines = []
    result = tune(model, x, candidates=candidates, rounds=2, threads=1, progress=lines.append, **kwargs)
    return result, lines


# --------------------------------------------------------------------------------------------
# Candidates and skip reasons (the CUDA ones are chosen and refused on any machine)
# --------------------------------------------------------------------------------------------


def test_option_names_round_trip():
    for option in candidate_options("cpu") + candidate_options("cuda"):
        assert Option.parse(option.name) == option
    assert Option.parse("compile:max-autotune/channels_last") == Option("compile", "channels_last", "max-autotune")
    with pytest.raises(ValueError, match="malformed candidate"):
        Option.parse("compile//x")


def test_candidates_per_device():
    cpu = [o.name for o in candidate_options("cpu")]
    cuda = [o.name for o in candidate_options("cuda")]
    assert cpu[:3] == ["eager/packed", "eager/channels_last", "eager/contiguous"]
    assert {"compile/channels_last", "compile/contiguous", "aoti/channels_last", "onnxruntime"} <= set(cpu)
    assert not any(n.startswith("cudagraphs") or ":" in n for n in cpu)
    # CUDA: no packed layout; CUDA graphs and every compile mode the issue of GPU latency needs
    assert "eager/packed" not in cuda
    assert {"cudagraphs/contiguous", "compile:reduce-overhead/channels_last", "compile:max-autotune/contiguous"} <= set(
        cuda
    )


def test_skip_reasons(monkeypatch):
    assert "CUDA device" in skip_reason(Option("cudagraphs", "channels_last"), "cpu", "fp32")
    assert "for CUDA" in skip_reason(Option("compile", "channels_last", "reduce-overhead"), "cpu", "fp32")
    assert "eager mode on CPU" in skip_reason(Option("compile", "packed"), "cpu", "fp32")
    assert "eager mode on CPU" in skip_reason(Option("eager", "packed"), "cuda", "fp32")
    assert "fp32 graph" in skip_reason(Option("onnxruntime"), "cpu", "bf16")
    assert "tf32 is a CUDA" in skip_reason(Option("eager", "contiguous"), "cpu", "tf32")
    assert skip_reason(Option("aoti", "contiguous"), "cpu", "bf16") is None  # autocast inside the exported graph
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert "onnxruntime-gpu" in skip_reason(Option("onnxruntime"), "cuda", "fp32")
    monkeypatch.setattr(backends, "cxx_compiler_available", lambda: False)
    assert "C++ compiler" in skip_reason(Option("aoti", "contiguous"), "cpu", "fp32")
    assert skip_reason(Option("compile", "contiguous"), "cuda", "fp32") is None  # triton, not a host compiler
    with pytest.raises(ValueError, match="unknown backend"):
        skip_reason(Option("tensorrt"), "cpu", "fp32")
    with pytest.raises(ValueError, match="unknown layout"):
        skip_reason(Option("eager", "nhwc"), "cpu", "fp32")


def test_objective_statistic():
    steady = CandidateResult("a", "eager", "contiguous", None, latency_ms_p50=10.0, latency_ms_p90=11.0)
    spiky = CandidateResult("b", "eager", "contiguous", None, latency_ms_p50=9.0, latency_ms_p90=20.0)
    assert min([steady, spiky], key=lambda c: score(c, "throughput")) is spiky
    assert min([steady, spiky], key=lambda c: score(c, "latency")) is steady
    assert score(CandidateResult("c", "eager", "keep", None), "latency") == math.inf


# --------------------------------------------------------------------------------------------
# Tuning: verification, failures, the winner
# --------------------------------------------------------------------------------------------


def test_tune_verifies_times_and_picks_the_fastest_verified():
    model = small_net()
    x = torch.randn(2, 3, 32, 32)
    result, lines = _tune(model, x, ["eager/packed", "eager/contiguous", "cudagraphs/channels_last"])
    by = {c.name: c for c in result.candidates}
    assert by["cudagraphs/channels_last"].status == "skipped" and "CUDA" in by["cudagraphs/channels_last"].error
    for name in ("eager/packed", "eager/contiguous"):
        c = by[name]
        assert c.ok and c.max_rel_err <= 1e-4 and c.prepare_s >= 0 and len(c.round_medians_ms) == 2
        assert c.latency_ms_p10 <= c.latency_ms_p50 <= c.latency_ms_p90
    assert result.best.name in ("eager/packed", "eager/contiguous")
    assert result.best.latency_ms_p50 == min(c.latency_ms_p50 for c in result.candidates if c.ok)
    assert by["eager/packed"].speedup_vs_eager == 1.0  # the first eager candidate is the yardstick
    with torch.no_grad():
        assert torch.allclose(result.forward(x), model(x), rtol=1e-4, atol=1e-5)
    assert list(result.prepared) == [result.best.name]  # the others are freed
    assert any("skipped" in line for line in lines) and any("round 2/2 done" in line for line in lines)
    assert result.settings["output_shapes"] == [[2, 10]] and result.settings["tolerance"] == 1e-4
    record = result.to_dict()
    assert record["best"] == result.best.name and json.dumps(record)  # JSON-ready


def test_mismatching_and_failing_candidates_are_reported_never_picked(monkeypatch):
    """A candidate that is fastest but wrong on fresh inputs, and one whose build fails, lose."""
    real_prepare = backends.prepare

    def fake_prepare(model, x, backend, precision, device, compile_mode=None, threads=None):
        prepared = real_prepare(model, x, "eager", precision, device, compile_mode, threads)
        if backend == "torchscript":  # stands in for a backend that fails to build
            raise RuntimeError("cannot trace this model")
        if backend == "eager" and next(model.parameters()).is_contiguous(memory_format=torch.channels_last):
            cached = prepared.run(x)  # right on the timing input only: a stale, instant answer
            prepared.step, prepared.run = (lambda: cached), (lambda inp: cached)
        return prepared

    monkeypatch.setattr(backends, "prepare", fake_prepare)
    model = small_net()
    x = torch.randn(2, 3, 32, 32)
    result, lines = _tune(model, x, ["eager/channels_last", "eager/contiguous", "torchscript/contiguous"])
    by = {c.name: c for c in result.candidates}
    assert by["eager/channels_last"].status == "mismatch" and by["eager/channels_last"].max_rel_err > 1e-4
    assert "against the fp32 eager model" in by["eager/channels_last"].error
    assert by["torchscript/contiguous"].status == "error" and "cannot trace" in by["torchscript/contiguous"].error
    assert result.best.name == "eager/contiguous"
    assert any("MISMATCH" in line for line in lines)


def test_no_winner_raises_the_right_error(monkeypatch):
    real_prepare = backends.prepare

    def wrong(model, x, *args, **kwargs):
        prepared = real_prepare(model, x, *args, **kwargs)
        prepared.run = lambda inp: torch.zeros(inp.shape[0], 10)
        return prepared

    monkeypatch.setattr(backends, "prepare", wrong)
    result, _ = _tune(small_net(), torch.randn(1, 3, 32, 32), ["eager/contiguous"])
    assert result.best is None
    with pytest.raises(VerificationError, match="1 mismatch"):
        require_best(result)
    with pytest.raises(LowformerRuntimeError, match="no candidate"):
        result.forward  # noqa: B018
    result, _ = _tune(small_net(), torch.randn(1, 3, 32, 32), ["cudagraphs/contiguous"])
    with pytest.raises(LowformerRuntimeError, match="1 skipped"):
        require_best(result)


def test_tune_arguments():
    model, x = small_net(), torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="objective"):
        tune(model, x, objective="fastest")
    with pytest.raises(ValueError, match="precision"):
        tune(model, x, precision="int8")
    with pytest.raises(ValueError, match="distinct"):
        tune(model, x, candidates=["eager/contiguous", "eager/contiguous"])
    with pytest.raises(ValueError, match="model.eval"):
        tune(SmallNet(), x, candidates=["eager/contiguous"])


def test_tune_bf16_autocast_within_its_tolerance():
    model = small_net()
    result, _ = _tune(model, torch.randn(2, 3, 32, 32), ["eager/contiguous"], precision="bf16")
    (c,) = result.candidates
    assert c.ok and 1e-4 < c.max_rel_err <= tuner_module.TOLERANCES["bf16"]  # bf16 is not fp32, but close


def test_our_model_tunes_across_layouts_exactly():
    """Deploy mode in every eager layout of a real variant, at non-default BatchNorm statistics."""
    model = lowformer.create_model("lowformer_b0").eval()
    randomize_bn(model)
    result, _ = _tune(model, torch.randn(1, 3, 64, 64), ["eager/packed", "eager/channels_last", "eager/contiguous"])
    assert all(c.ok and c.max_rel_err <= 1e-5 for c in result.candidates)


# --------------------------------------------------------------------------------------------
# Packages
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_tuning():
    model = small_net()
    x = torch.randn(1, 3, 32, 32)
    result, _ = _tune(model, x, ["eager/contiguous", "onnxruntime"])
    return model, result


def test_onnx_package_round_trip(onnx_tuning, tmp_path):
    model, result = onnx_tuning
    path, chosen = save_tuned(result, tmp_path / "out" / "small.onnx", model, name="small", checkpoint=None)
    assert chosen.name == "onnxruntime" and path.exists()
    assert not list(path.parent.glob(".*.tmp"))  # written atomically: no temporary file left
    record = read_record(path)
    assert record["schema"] == "lowformer.deployed/1" and record["model"] == "small"
    assert record["input_shape"] == [1, 3, 32, 32] and record["output_shapes"] == [[1, 10]]
    assert record["precision"] == "fp32" and record["device"] == "cpu" and record["candidate"] == "onnxruntime"
    assert len(record["weights_sha256"]) == 64 and record["tuning"]["best"] == result.best.name
    assert {c["name"] for c in record["tuning"]["candidates"]} == {"eager/contiguous", "onnxruntime"}
    deployed = load_deployed(path, threads=1)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(deployed(x), model(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="compiled for input shape"):
        deployed(torch.randn(2, 3, 32, 32))
    check = check_package(path, model)
    assert check.passed and check.load_to_first_output_s > 0


def test_package_errors(onnx_tuning, tmp_path):
    model, result = onnx_tuning
    with pytest.raises(ValueError, match=r"\.pt2 \(AOTInductor\) or \.onnx"):
        save_tuned(result, tmp_path / "model.bin", model)
    with pytest.raises(ValueError, match="needs a aoti candidate"):
        save_tuned(result, tmp_path / "model.pt2", model)
    for suffix in (".pt2", ".onnx"):
        bad = tmp_path / f"bad{suffix}"
        bad.write_bytes(b"not a package")
        with pytest.raises(ValueError, match="is not an"):
            read_record(bad)
    with pytest.raises(FileNotFoundError):
        load_deployed(tmp_path / "missing.onnx")


def test_aoti_package_loads_without_compiling(tmp_path):
    """The one compile of this file: AOTInductor on a small net; the package's first call is fast."""
    model = small_net()
    x = torch.randn(2, 3, 32, 32)
    result, _ = _tune(model, x, ["eager/contiguous", "aoti/channels_last"])
    aoti = next(c for c in result.candidates if c.backend == "aoti")
    if not aoti.ok:
        pytest.skip(f"AOTInductor does not build here: {aoti.error}")
    assert "freezing" in aoti.note and aoti.max_rel_err <= 1e-4
    path, chosen = save_tuned(result, tmp_path / "small.pt2", model, name="small")
    assert chosen.name == "aoti/channels_last"
    assert read_record(path)["candidate"] == "aoti/channels_last"  # read without loading the code
    check = check_package(path, model)
    assert check.passed
    assert check.load_to_first_output_s < 10  # loading runs no compiler (a compile takes tens of seconds)
    deployed = load_deployed(path)
    with torch.no_grad():
        assert torch.allclose(deployed(x), model(x), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def test_cli_tune_writes_a_verified_onnx_package(tmp_path, capsys):
    out, js = tmp_path / "b0.onnx", tmp_path / "b0.json"
    argv = ["tune", "lowformer_b0", "--image-size", "32", "--batch-size", "1", "--threads", "1", "--rounds", "1"]
    code = main([*argv, "--candidates", "eager/packed", "onnxruntime", "--out", str(out), "--json", str(js)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "objective latency" in text and "eager/packed" in text and "onnxruntime" in text
    assert "loaded in" in text and "nothing compiled" in text and ": ok" in text
    assert read_record(out)["model"] == "lowformer_b0"
    assert json.loads(js.read_text())["schema"] == "lowformer.tune/1"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["tune", "lowformr_b1"], "Did you mean"),
        (["tune", "lowformer_b0", "--out", "x.engine"], ".pt2 (AOTInductor) or .onnx"),
        (["tune", "lowformer_b0", "--out", "x.pt2", "--candidates", "eager/packed"], "add one to --candidates"),
        (["tune", "edgevit_xs", "--image-size", "200"], "multiples of 32"),
        (["tune"], "name a model"),
    ],
)
def test_cli_usage_errors_exit_2(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_list_candidates(capsys):
    assert main(["tune", "--list-candidates", "--device", "cpu"]) == 0
    assert "eager/packed" in capsys.readouterr().out


def test_cli_unwritable_out_fails_before_tuning(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    os.chmod(folder, 0o555)
    cmd = [sys.executable, "-m", "lowformer", "tune", "lowformer_b0", "--out", str(folder / "b0.pt2")]
    package_root = str(Path(lowformer.__file__).resolve().parents[1])  # this checkout, in the child too
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    proc = run_unprivileged(cmd, cwd=tmp_path, env=env)
    assert proc.returncode == 1, proc.stderr
    assert "cannot write" in proc.stderr and "tuning on" not in proc.stdout

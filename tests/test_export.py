"""Export to ONNX and TorchScript: every registered model, dynamic axes, fp16, the CLI, and a verify
that fails when the file is wrong."""

import errno
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_bn, run_unprivileged

import lowformer
from lowformer.cli import main
from lowformer.errors import LowformerRuntimeError
from lowformer.export import (
    DEFAULT_OPSET,
    FP16_BOUND,
    KEEP_FP32_OPS,
    convert_float16,
    export,
    verify,
    verify_shapes,
)

MODELS = lowformer.list_models()
SUBSET = ["lowformer_b0", "lowformer_e3", "edgevit_xxs"]  # norms + MLP, attention without MLP, EdgeViT


def _deployed(name: str, seed: int = 0) -> torch.nn.Module:
    """Deploy form of a model with non-default BatchNorm statistics and norm affines."""
    torch.manual_seed(seed)
    model = lowformer.create_model(name).eval()
    randomize_bn(model, seed=seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    for m in model.modules():
        if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None:
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
    return lowformer.deploy(model)


def _input_dims(path) -> list:
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    return [d.dim_param or d.dim_value for d in dims]


def _opset(path) -> int:
    return next(o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx"))


def _fp16_copy(path: Path) -> Path:
    """The fp16 graph `export(..., fp16=True)` writes, converted from an fp32 file already exported
    (the same `convert_float16` call; it spares a second dynamo export per model)."""
    fp16 = path.with_name(f"{path.stem}_fp16.onnx")
    onnx.save(convert_float16(onnx.load(str(path))), str(fp16))
    return fp16


@pytest.fixture(scope="module")
def exports(module_dir):
    """Files exported once and read by several tests: `exports(name, format)` -> (model, path), made
    on first use. ONNX: dynamo, 64x96, batch dynamic (the every-model test's export); TorchScript:
    traced at 64x96. The model is `_deployed(name)`, seed 0."""
    made = {}

    def get(name: str, format: str = "onnx") -> tuple[torch.nn.Module, Path]:
        if (name, format) not in made:
            model = _deployed(name)
            if format == "onnx":
                path = export(model, module_dir / f"{name}_batch.onnx", "onnx", (64, 96), dynamic_batch=True)
            else:
                path = export(model, module_dir / f"{name}.pt", "torchscript", (64, 96))
            made[name, format] = (model, path)
        return made[name, format]

    return get


@pytest.mark.parametrize("name", MODELS)
def test_onnx_every_model_dynamic_batch_fp32_and_fp16(name, exports):
    model, path = exports(name)
    assert _input_dims(path) == ["batch", 3, 64, 96]
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["lowformer.exporter"] == "dynamo" and _opset(path) == DEFAULT_OPSET == 18
    report = verify(model, path, "onnx", (64, 96), dynamic_batch=True)
    assert report.input_shapes == [(1, 3, 64, 96), (3, 3, 64, 96)]
    assert report.passed, report.summary()
    assert report.max_rel_err <= 1e-4 and report.bound == 1e-4
    report = verify(model, _fp16_copy(path), "onnx", (64, 96), dynamic_batch=True, fp16=True)
    assert report.bound == FP16_BOUND and report.finite  # no inf/nan in any fp16 tensor of the graph
    assert report.passed, report.summary()
    assert report.max_rel_err > 1e-5  # it really is half precision


@pytest.fixture(scope="module")
def dynamic_exports(module_dir):
    """SUBSET exported once by the dynamo exporter with batch, height and width dynamic: {name: (model, path)}."""
    folder = module_dir
    sizes = {"lowformer_b0": (64, 96), "lowformer_e3": (64, 64), "edgevit_xxs": (64, 64)}
    exports = {}
    for name in SUBSET:
        model = _deployed(name)
        path = export(model, folder / f"{name}.onnx", "onnx", sizes[name], dynamic_batch=True, dynamic_size=True)
        exports[name] = (model, path, sizes[name])
    return exports


@pytest.mark.parametrize(
    "name, other", [("lowformer_b0", (65, 97)), ("lowformer_e3", (65, 65)), ("edgevit_xxs", (96, 128))]
)
def test_onnx_dynamic_size_is_right_at_another_size(name, other, dynamic_exports):
    # 65x97: odd, so LowFormer's stride-2 attention up-conv overshoots and the crop must follow the input;
    # EdgeViT promises multiples of 32 only
    model, path, image_size = dynamic_exports[name]
    assert verify_shapes(image_size, 1, True, True, lowformer.get_entry(name).size_divisor)[-1][1:] == other
    assert _input_dims(path) == ["batch", 3, "height", "width"]
    report = verify(model, path, "onnx", image_size, dynamic_batch=True, dynamic_size=True)
    assert report.input_shapes[-1] == (3, 3, *other)
    assert report.passed, report.summary()
    smallest = 32  # the size rule's minimum: LowFormer's last stage is 1x1 there, EdgeViT's too
    assert verify(model, path, "onnx", shapes=[(2, smallest, smallest)]).passed


@pytest.mark.parametrize("name", SUBSET)
def test_fp16_onnx_of_a_dynamic_graph_is_finite_and_close(name, dynamic_exports):
    model, path, image_size = dynamic_exports[name]
    fp16 = _fp16_copy(path)
    graph = onnx.load(str(fp16)).graph
    fp16_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert sum(np.prod(t.dims) for t in fp16_weights) > 0.9 * sum(p.numel() for p in model.parameters())
    report = verify(model, fp16, "onnx", image_size, dynamic_batch=True, dynamic_size=True, fp16=True)
    assert report.bound == FP16_BOUND and report.finite
    assert report.passed, report.summary()


def test_onnx_static_export_has_fixed_shape(tmp_path):
    model = _deployed("lowformer_b0")
    path = export(model, tmp_path / "m.onnx", "onnx", (64, 64), batch_size=2)
    assert _input_dims(path) == [2, 3, 64, 64]
    assert verify(model, path, "onnx", (64, 64), batch_size=2).passed


def test_onnx_features_only_exports_every_level(tmp_path):
    model = lowformer.deploy(lowformer.create_model("lowformer_b0", features_only=True).eval())
    path = export(model, tmp_path / "f.onnx", "onnx", (64, 64), dynamic_size=True)
    outputs = onnx.load(str(path)).graph.output
    assert [o.name for o in outputs] == ["output_0", "output_1", "output_2", "output_3"]
    # the dynamo exporter derives each level's size from the input's: stride 4 is ceil(height / 4)
    assert outputs[0].type.tensor_type.shape.dim[2].dim_param == "(((height - 1)//4)) + 1"
    report = verify(model, path, "onnx", (64, 64), dynamic_size=True)
    assert report.passed, report.summary()


@pytest.mark.parametrize("name", SUBSET)
def test_torchscript_based_onnx_exporter_is_the_fallback(name, tmp_path):
    """The legacy exporter still writes every kind of model, dynamic and fp16, and says it is deprecated."""
    model = _deployed(name)
    with pytest.warns(FutureWarning, match="legacy TorchScript-based ONNX export"):
        path = export(model, tmp_path / "m.onnx", "onnx", (64, 64), True, True, exporter="torchscript", opset=17)
    assert _input_dims(path) == ["batch", 3, "height", "width"] and _opset(path) == 17
    assert {p.key: p.value for p in onnx.load(str(path)).metadata_props}["lowformer.exporter"] == "torchscript"
    report = verify(model, path, "onnx", (64, 64), dynamic_batch=True, dynamic_size=True)
    assert report.passed, report.summary()
    report = verify(model, _fp16_copy(path), "onnx", (64, 64), dynamic_batch=True, dynamic_size=True, fp16=True)
    assert report.finite and report.passed, report.summary()


class _DataDependent(torch.nn.Module):
    """Python control flow on a tensor's value: the legacy tracer records the branch taken,
    `torch.export` refuses to guess."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.abs().max() > 0:  # true for any input but zeros
            y = y.relu()
        return y


def test_a_model_dynamo_cannot_export_gets_the_fallback_named(tmp_path, capfd):
    model = _DataDependent().eval()
    with pytest.raises(LowformerRuntimeError) as info:
        export(model, tmp_path / "m.onnx", "onnx", (32, 32))
    message = str(info.value)
    assert message.startswith("the dynamo ONNX exporter cannot export _DataDependent: GuardOnDataDependentSymNode")
    assert message.endswith('--exporter torchscript; Python: exporter="torchscript") instead')
    assert "\n" not in message and not list(tmp_path.iterdir())
    assert "def forward" not in capfd.readouterr().err  # torch's partial graph went to the debug log
    with pytest.warns(FutureWarning, match="legacy TorchScript-based ONNX export"):
        path = export(model, tmp_path / "m.onnx", "onnx", (32, 32), exporter="torchscript")
    assert verify(model, path, "onnx", (32, 32)).passed


def test_missing_onnxscript_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # `import onnxscript` now raises ImportError
    with pytest.raises(LowformerRuntimeError, match=r"needs the onnxscript package: pip install 'lowformer\[onnx\]'"):
        export(_DataDependent().eval(), tmp_path / "m.onnx", "onnx", (32, 32))
    assert not list(tmp_path.iterdir())


def test_a_model_that_fixes_its_size_is_told_to_export_a_fixed_size(tmp_path):
    model = lowformer.create_model("timm:vit_tiny_patch16_224").eval()  # position embeddings of 14x14 patches
    with pytest.raises(LowformerRuntimeError, match="with a dynamic height/width: .* static shape of 224") as info:
        export(model, tmp_path / "vit.onnx", "onnx", (224, 224), dynamic_size=True)
    assert "if the model needs a fixed height/width, export without the dynamic option" in str(info.value)
    assert "\n" not in str(info.value) and ".;" not in str(info.value)


@pytest.mark.parametrize("name", SUBSET)
def test_torchscript_traced_graph_follows_the_input_shape(name, exports):
    model, path = exports(name, "torchscript")
    report = verify(model, path, "torchscript", (64, 96), dynamic_batch=True, dynamic_size=True)
    assert len(report.input_shapes) == 3
    assert report.passed, report.summary()


def test_fp16_graph_keeps_softmax_norms_and_attention_logits_in_fp32(dynamic_exports):
    path = _fp16_copy(dynamic_exports["lowformer_b0"][1])
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True)
    graph = model.graph
    dtype = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output, *graph.value_info)}
    dtype.update({t.name: t.data_type for t in graph.initializer})
    producer = {o: n for n in graph.node for o in n.output}
    FP32, FP16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert dtype["input"] == FP32 and dtype["output"] == FP32
    seen = set()
    for n in graph.node:
        if n.op_type in KEEP_FP32_OPS:
            seen.add(n.op_type)
            assert dtype[n.input[0]] == FP32 and dtype[n.output[0]] == FP32, n.name
        if n.op_type == "Softmax":
            logits = producer[n.input[0]]
            assert logits.op_type == "MatMul" and all(dtype[i] == FP32 for i in logits.input)
        if n.op_type in ("Conv", "ConvTranspose", "Gemm"):
            assert dtype[n.output[0]] == FP16, n.name
    assert {"Softmax", "InstanceNormalization", "LayerNormalization", "ReduceMean"} <= seen


class _Attention(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D), q = k = v = x
        q = x.unsqueeze(1)
        return F.scaled_dot_product_attention(q, q, q).squeeze(1)


class _Norm(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "module, x",
    [
        (_Attention(), 100 + _randn(1, 8, 64)),  # QK^T / sqrt(d) ~ 8e4 > 65504, the fp16 maximum
        (_Norm(), 300 + 50 * _randn(1, 8, 256)),  # the sum of squares overflows, the values do not
    ],
)
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_fp16_policy_prevents_overflow(module, x, dynamo):
    """Evaluated in true fp16 (onnx.reference runs numpy in the graph's types; ONNX Runtime's CPU
    provider computes fp16 MatMul/Softmax/LayerNorm in fp32 internally and would hide the overflow),
    on the graphs of both exporters (their node names, decompositions and constants differ)."""
    from onnx.reference import ReferenceEvaluator

    module.eval()
    if dynamo:
        program = torch.onnx.export(module, (x,), dynamo=True, opset_version=18, input_names=["input"], verbose=False)
        fp32 = program.model_proto
    else:
        buffer = io.BytesIO()
        torch.onnx.export(module, (x,), buffer, dynamo=False, opset_version=17, input_names=["input"])
        fp32 = onnx.load_model_from_string(buffer.getvalue())
    expected = module(x).detach().numpy()

    def run(model):
        with np.errstate(all="ignore"):
            return ReferenceEvaluator(model).run(None, {"input": x.numpy()})[0].astype(np.float32)

    ours = run(convert_float16(fp32))
    assert np.isfinite(ours).all()
    assert np.abs(ours - expected).max() / np.abs(expected).max() < 2e-2
    naive = run(convert_float16(fp32, keep_fp32_ops=frozenset(), attention_logits_fp32=False))
    assert not np.isfinite(naive).all()  # the check can fail: without the policy fp16 overflows


class _Loud(torch.nn.Module):
    """Conv activations ~1e5, beyond fp16; the head scales them back, so the output is moderate."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 4)
        with torch.no_grad():
            self.conv.weight.mul_(1e5)
            self.fc.weight.mul_(1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).relu().mean((2, 3)))


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_fp16_verify_catches_an_overflow_inside_the_graph(exporter, tmp_path):
    # ONNX Runtime on CPU computes this Conv in fp32 and may pass the overflow on unseen
    model = _Loud().eval()
    path = export(model, tmp_path / "loud.onnx", "onnx", (32, 32), fp16=True, exporter=exporter)
    report = verify(model, path, "onnx", (32, 32), fp16=True)
    assert not report.passed and not report.finite
    conv = next(n for n in onnx.load(str(path)).graph.node if n.op_type == "Conv")  # names differ by exporter
    assert report.checks[0].overflowed[0] == conv.output[0] and "fp16 tensors overflow" in report.summary()


def test_verify_fails_for_a_file_from_other_weights(exports):
    other = _deployed("lowformer_b0", seed=10)
    _, path = exports("lowformer_b0")  # the weights of seed 0
    report = verify(other, path, "onnx", (64, 96))
    assert report.finite and not report.passed
    assert report.max_rel_err > 1e-2 and "FAILED" in report.summary()
    _, ts = exports("lowformer_b0", "torchscript")
    assert not verify(other, ts, "torchscript", (64, 96)).passed


def test_failed_export_leaves_nothing_half_written(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous")

    def broken_export(*args, **kwargs):
        raise RuntimeError("exporter crashed")

    def broken_save(module, f, **kwargs):
        Path(f).write_bytes(b"partial")
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    with pytest.raises(RuntimeError, match="exporter crashed"):
        export(_deployed("lowformer_b0"), path, "onnx", (64, 64))
    assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == ["m.onnx"]

    monkeypatch.setattr(torch.jit, "save", broken_save)
    with pytest.raises(RuntimeError, match="exporter crashed"):
        export(_deployed("lowformer_b0"), tmp_path / "new" / "m.pt", "torchscript", (64, 64))
    assert os.listdir(tmp_path / "new") == []


def test_bad_export_arguments_raise_value_errors(tmp_path):
    model = _deployed("edgevit_xxs")
    with pytest.raises(ValueError, match="multiples of 32"):
        export(model, tmp_path / "m.onnx", "onnx", (64, 80))
    with pytest.raises(ValueError, match="unknown export format"):
        export(model, tmp_path / "m.tflite", "tflite", (64, 64))
    with pytest.raises(ValueError, match="ONNX only"):
        export(model, tmp_path / "m.pt", "torchscript", (64, 64), fp16=True)
    with pytest.raises(ValueError, match="opset >= 17"):
        export(model, tmp_path / "m.onnx", "onnx", (64, 64), fp16=True, opset=16)
    with pytest.raises(
        ValueError, match="dynamo ONNX exporter writes opset 18 or later, not 17; .*--exporter torchscript"
    ):
        export(model, tmp_path / "m.onnx", "onnx", (64, 64), opset=17)
    with pytest.raises(ValueError, match="unknown ONNX exporter 'tvm'; choose from dynamo, torchscript"):
        export(model, tmp_path / "m.onnx", "onnx", (64, 64), exporter="tvm")
    with pytest.raises(ValueError, match="applies to ONNX; a TorchScript file is always traced"):
        export(model, tmp_path / "m.pt", "torchscript", (64, 64), exporter="dynamo")
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def test_cli_end_to_end(tmp_path):
    out = tmp_path / "sub" / "dir" / "b0.onnx"
    r = subprocess.run(
        [sys.executable, "-m", "lowformer", "export", "lowformer_b0", "--format", "onnx", "--image-size", "64", "96"]
        + ["--dynamic-batch", "--dynamic-size", "--out", str(out), "--verify"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert out.is_file() and os.listdir(out.parent) == ["b0.onnx"]
    assert (
        f"wrote {out}" in r.stdout and "onnx, opset 18, dynamo exporter, fp32" in r.stdout and "deploy on" in r.stdout
    )
    assert r.stderr == ""  # no progress lines, warnings or logs from the exporter
    assert "batch, height, width" in r.stdout
    assert "1x3x64x96, 3x3x64x96, 3x3x65x97" in r.stdout and "max rel err" in r.stdout and ": ok" in r.stdout
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["lowformer.model"] == "lowformer_b0" and props["lowformer.deploy"] == "on"
    assert props["lowformer.exporter"] == "dynamo"


def test_cli_torchscript_exporter_shows_the_deprecation(tmp_path, capsys):
    out = tmp_path / "b0.onnx"
    args = ["lowformer_b0", "--image-size", "64", "64", "--exporter", "torchscript", "--opset", "17"]
    assert main(["export", *args, "--out", str(out), "--verify"]) == 0
    captured = capsys.readouterr()
    assert "onnx, opset 17, TorchScript-based exporter, fp32" in captured.out and ": ok" in captured.out
    (line,) = captured.err.splitlines()  # torch's own words, once, as one line
    assert line.startswith("lowformer export: warning: You are using the legacy TorchScript-based ONNX export.")


def test_cli_model_dynamo_cannot_export_exits_1_naming_the_fallback(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("lowformer.cli.export.create_model", lambda name, **kwargs: _DataDependent())
    out = tmp_path / "m.onnx"
    rc = main(["export", "lowformer_b0", "--no-deploy", "--image-size", "32", "32", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 1 and captured.out == "" and not out.exists()
    assert captured.err.startswith("lowformer export: error: the dynamo ONNX exporter cannot export _DataDependent")
    assert captured.err.endswith('(--exporter torchscript; Python: exporter="torchscript") instead\n')
    assert len(captured.err.splitlines()) == 1


def test_cli_torchscript_fp16_and_no_deploy(tmp_path, capsys):
    args = ["lowformer_b0", "--image-size", "64", "64", "--no-deploy", "--fp16", "--out", str(tmp_path / "b0.onnx")]
    assert main(["export", *args, "--verify"]) == 0
    out = capsys.readouterr().out
    assert "deploy off" in out and "fp16" in out and "<= 1e-02: ok" in out
    args = ["edgevit_xxs", "--format", "torchscript", "--image-size", "64", "64", "--dynamic-size"]
    assert main(["export", *args, "--out", str(tmp_path / "e.pt"), "--verify"]) == 0
    assert "1x3x64x64, 1x3x96x128" in capsys.readouterr().out


def test_cli_verify_failure_exits_1(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("lowformer.export.verifier.FP32_BOUND", 0.0)  # ONNX Runtime is never bit-exact
    out = tmp_path / "b0.onnx"
    rc = main(["export", "lowformer_b0", "--image-size", "64", "64", "--out", str(out), "--verify"])
    assert rc == 1
    captured = capsys.readouterr()
    assert "> 0e+00: FAILED" in captured.out
    assert captured.err.startswith("lowformer export: error: verification failed (max rel err ")
    assert captured.err.endswith(f"bound 0e+00); {out} is kept for inspection\n") and out.is_file()


@pytest.mark.parametrize(
    "args, text",
    [
        (["lowformer_b7"], "Did you mean"),
        (["lowformer_b0", "--format", "tflite"], "invalid choice"),
        (
            ["lowformer_b0", "--image-size", "16", "16"],
            "16x16 is too small for lowformer_b0: height and width must be >= 32",
        ),
        (["edgevit_xxs", "--image-size", "64", "80"], "multiples of 32, got 64x80 (e.g. 64x96)"),
        (["lowformer_b0", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["resnet18"], "it is a timm model, write timm:resnet18"),
        (["lowformer_b0", "--format", "torchscript", "--fp16"], "ONNX only"),
        (["lowformer_b0", "--fp16", "--opset", "16"], "--opset 17"),
        (["lowformer_b0", "--opset", "17"], "writes opset 18 or later, not 17; for an older opset use the"),
        (["lowformer_b0", "--exporter", "tvm"], "invalid choice: 'tvm'"),
        (
            ["lowformer_b0", "--format", "torchscript", "--exporter", "torchscript"],
            "--exporter applies to --format onnx",
        ),
    ],
)
def test_cli_bad_arguments_exit_2(args, text, tmp_path, capsys):
    out = tmp_path / "x" / "m.onnx"
    try:
        rc = main(["export", *args, "--out", str(out)])
    except SystemExit as e:  # argparse errors
        rc = e.code
    assert rc == 2
    assert text in capsys.readouterr().err
    assert not out.parent.exists()


# --------------------------------------------------------------------------------------------
# Failures the user can cause: one line naming the cause, exit 1, and before the slow part
# --------------------------------------------------------------------------------------------


def test_cli_read_only_output_folder_fails_before_the_export(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    cmd = [sys.executable, "-m", "lowformer", "export", "lowformer_b0", "--out", str(ro / "b0.onnx"), "--verify"]
    # tests run as root, who writes anywhere: the command runs without that power, as a user's would
    r = run_unprivileged(cmd, tmp_path, env={**os.environ, "LOWFORMER_DEBUG": ""})
    assert r.returncode == 1
    assert r.stderr == f"lowformer export: error: cannot write {ro / 'b0.onnx'}: permission denied\n"
    assert r.stdout == "" and list(ro.iterdir()) == []


@pytest.mark.parametrize(
    "out, cause", [("folder", "it is a folder; give a file name"), ("file/b0.onnx", "{}/file is a file, not a folder")]
)
def test_cli_output_in_the_way_is_one_line(out, cause, tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("a file where a folder must be")
    rc = main(["export", "lowformer_b0", "--out", str(tmp_path / out)])
    captured = capsys.readouterr()
    assert rc == 1 and captured.out == ""
    assert captured.err == f"lowformer export: error: cannot write {tmp_path / out}: {cause.format(tmp_path)}\n"


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB tmpfs: an export of 56 MB fills it. Needs the right to mount (root in a container
    usually has it); without it the case is skipped, and says so."""
    mount = tmp_path / "small"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_cli_disk_full_is_one_line_and_leaves_nothing(full_disk, capsys):
    (full_disk / "old.onnx").write_bytes(b"an earlier export")
    rc = main(["export", "lowformer_b0", "--image-size", "64", "64", "--out", str(full_disk / "old.onnx")])
    captured = capsys.readouterr()
    assert rc == 1 and captured.out == ""
    assert captured.err == f"lowformer export: error: cannot write {full_disk / 'old.onnx'}: no space left on device\n"
    assert [p.name for p in full_disk.iterdir()] == ["old.onnx"]  # no temporary file, the old file intact
    assert (full_disk / "old.onnx").read_bytes() == b"an earlier export"


def test_disk_full_in_the_library_keeps_the_old_file(tmp_path, monkeypatch, exports):
    from lowformer.errors import OutputError

    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous")
    # the graph export() writes: the bytes of the same model's export, not a second export of it
    data = exports("lowformer_b0")[1].read_bytes()
    monkeypatch.setattr("lowformer.export.exporter.onnx_bytes", lambda *args: data)

    def full(self, data):
        with open(self, "wb") as f:
            f.write(data[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(OutputError, match="cannot write .*m.onnx: no space left on device"):
        export(_deployed("lowformer_b0"), path, "onnx", (64, 64))
    monkeypatch.undo()
    assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == ["m.onnx"]


def test_cli_export_refuses_a_size_that_does_not_fit_in_memory(tmp_path):
    out = tmp_path / "b1.onnx"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "lowformer",
            "export",
            "lowformer_b1",
            "--image-size",
            "40000",
            "40000",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1
    assert r.stderr.startswith("lowformer export: error: exporting lowformer_b1 at 1x3x40000x40000 needs ~")
    assert r.stderr.rstrip().endswith("GiB available; try a smaller --image-size or --batch-size")
    assert not out.exists()


def test_cli_timm_model_in_fp16_from_a_dynamo_graph(tmp_path, capsys):
    """A timm peer through the default exporter and the fp16 converter, batch dynamic (RepViT: its
    random weights keep the activations in fp16 range; MobileOne's reach 1e15 and verify fails)."""
    out = tmp_path / "repvit_fp16.onnx"
    args = ["timm:repvit_m0_9", "--image-size", "64", "64", "--dynamic-batch", "--fp16", "--out", str(out), "--verify"]
    assert main(["export", *args]) == 0
    captured = capsys.readouterr()
    assert "onnx, opset 18, dynamo exporter, fp16" in captured.out and captured.err == ""
    assert "verify onnx fp16 vs PyTorch fp32 at 1x3x64x64, 3x3x64x64:" in captured.out
    assert "<= 1e-02: ok" in captured.out
    assert _input_dims(out) == ["batch", 3, 64, 64]
    assert {p.key: p.value for p in onnx.load(str(out)).metadata_props}["lowformer.exporter"] == "dynamo"


def test_cli_exports_a_timm_model_reparameterised(tmp_path, capsys):
    """timm:NAME exports as ours do; deploy mode is timm's reparameterize_model where the model has it."""
    files = {}
    for deploy in ("--deploy", "--no-deploy"):
        files[deploy] = tmp_path / f"mobileone{deploy}.onnx"
        args = ["timm:mobileone_s0", "--image-size", "64", "64", deploy, "--out", str(files[deploy]), "--verify"]
        assert main(["export", *args]) == 0
        out = capsys.readouterr().out
        assert (
            f"model         timm:mobileone_s0, deploy {deploy[2:].replace('no-deploy', 'off').replace('deploy', 'on')}"
            in out
        )
        assert ": ok" in out
    ops = {k: [n.op_type for n in onnx.load(str(v)).graph.node] for k, v in files.items()}
    # MobileOne's training form has parallel conv branches per block; the deployed one a single conv
    assert ops["--deploy"].count("Conv") < ops["--no-deploy"].count("Conv")
    props = {p.key: p.value for p in onnx.load(str(files["--deploy"])).metadata_props}
    assert props["lowformer.model"] == "timm:mobileone_s0" and props["lowformer.deploy"] == "on"

"""LowFormer family: official numbers, timm equivalence, official and timm checkpoint formats."""

import logging

import pytest
import timm
import torch
from helpers import randomize_bn

import lowformer
from lowformer.measure.macs import count_macs
from lowformer.models.lowformer import SPECS, convert_state_dict, to_official_state_dict

# (params in M to 2 decimals, MACs in M rounded) of the official implementation at 224x224, batch 1
OFFICIAL = {
    "lowformer_b0": (14.10, 944),
    "lowformer_b1": (17.94, 1411),
    "lowformer_b15": (33.98, 2574),
    "lowformer_b3": (57.09, 6099),
    "lowformer_e1": (18.90, 1348),
    "lowformer_e2": (22.75, 3789),
    "lowformer_e3": (41.32, 4866),
}
NAMES = list(OFFICIAL)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


@pytest.mark.parametrize("name", NAMES)
def test_params_and_macs_equal_official(name):
    report = count_macs(lowformer.create_model(name), 224)
    params_m, macs_m = OFFICIAL[name]
    assert round(report.params / 1e6, 2) == params_m
    assert round(report.macs / 1e6) == macs_m
    assert report.params_backbone + report.params_head == report.params


@pytest.fixture(scope="module")
def timm_models():
    """timm's independent port of each variant with non-default BatchNorm statistics."""
    torch.manual_seed(0)
    models = {}
    for name in NAMES:
        model = timm.create_model(name, pretrained=False).eval()
        randomize_bn(model)
        models[name] = model
    return models


@pytest.mark.parametrize("name", NAMES)
def test_equivalent_to_timm(name, timm_models, tmp_path):
    ref = timm_models[name]
    path = tmp_path / "timm_state.pth"
    torch.save(ref.state_dict(), path)
    ours = lowformer.create_model(name, checkpoint_path=path).eval()
    assert ours.pretrained_cfg["checkpoint_format"] == "timm"
    x = torch.randn(2, 3, 97, 131)
    with torch.no_grad():
        assert _rel_err(ref(x), ours(x)) <= 1e-5


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("torchscript_head", [False, True])
def test_official_release_layout(name, timm_models, tmp_path, torchscript_head):
    """An `evalmodel.pt` in the official layout, made from timm's weights by the inverse mapping."""
    ref = timm_models[name]
    native, fmt = convert_state_dict(ref.state_dict(), SPECS[name])
    assert fmt == "timm"
    official = to_official_state_dict(native, SPECS[name])
    assert any(k.startswith("backbone.input_stem.op_list.") for k in official)
    if torchscript_head:
        official = {("head.opseq." + k[5:] if k.startswith("head.") else k): v for k, v in official.items()}
    path = tmp_path / "evalmodel.pt"
    torch.save({"state_dict": official, "epoch": 299, "best_val": 79.9}, path)
    ours = lowformer.create_model(name, checkpoint_path=path).eval()
    assert ours.pretrained_cfg["checkpoint_format"] == "official"
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        assert _rel_err(ref(x), ours(x)) <= 1e-5


def test_convert_is_idempotent_and_native_passes_through():
    model = lowformer.create_model("lowformer_b0")
    native = model.state_dict()
    out, fmt = convert_state_dict(native, SPECS["lowformer_b0"])
    assert fmt == "native" and out is native


def test_wrong_variant_is_a_loud_error(tmp_path):
    b1 = lowformer.create_model("lowformer_b1")
    path = tmp_path / "evalmodel.pt"
    torch.save({"state_dict": to_official_state_dict(b1.state_dict(), SPECS["lowformer_b1"])}, path)
    with pytest.raises(lowformer.CheckpointError) as err:
        lowformer.create_model("lowformer_b0", checkpoint_path=path)
    msg = str(err.value)
    assert "detected format: official" in msg and "unexpected keys" in msg


def test_other_num_classes_drops_classifier_and_says_so(tmp_path, caplog):
    src = lowformer.create_model("lowformer_b0").eval()
    path = lowformer.save_checkpoint(src, tmp_path / "b0.safetensors")
    with caplog.at_level(logging.WARNING):
        model = lowformer.create_model("lowformer_b0", checkpoint_path=path, num_classes=10).eval()
    assert "dropped" in caplog.text
    assert model.get_classifier().out_features == 10
    assert torch.equal(
        model.stages[3].blocks[0].local.conv_pwl.conv.weight, src.stages[3].blocks[0].local.conv_pwl.conv.weight
    )


def test_checkpoint_classes_are_kept_by_default(tmp_path):
    src = lowformer.create_model("lowformer_b0", num_classes=37)
    path = lowformer.save_checkpoint(src, tmp_path / "pets.safetensors")
    assert lowformer.create_model("lowformer_b0", checkpoint_path=path).num_classes == 37


def test_training_checkpoint_with_args_namespace_loads(tmp_path):
    import argparse

    src = lowformer.create_model("lowformer_b0").eval()
    official = to_official_state_dict(src.state_dict(), SPECS["lowformer_b0"])
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": official, "epoch": 3, "args": argparse.Namespace(lr=1e-3, model="b0")}, path)
    model = lowformer.create_model("lowformer_b0", checkpoint_path=path).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))


class _Evil:
    def __reduce__(self):
        return (print, ("this would run",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": _Evil()}, path)
    with pytest.raises(lowformer.CheckpointError, match="refused"):
        lowformer.create_model("lowformer_b0", checkpoint_path=path)


def test_unknown_layout_and_missing_file(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(lowformer.CheckpointError, match="not a LowFormer state dict"):
        lowformer.create_model("lowformer_b0", checkpoint_path=path)
    with pytest.raises(FileNotFoundError):
        lowformer.create_model("lowformer_b0", checkpoint_path=tmp_path / "nope.pt")


def test_pretrained_from_local_weights_dir(tmp_path, monkeypatch, timm_models):
    monkeypatch.setenv("LOWFORMER_WEIGHTS", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        lowformer.create_model("lowformer_b1", pretrained=True)
    msg = str(err.value)
    assert "evalmodel.pt" in msg and "altair199797/LowFormer" in msg and "LOWFORMER_WEIGHTS" in msg
    # the official release folder structure, dropped into the weights dir
    ref = timm_models["lowformer_b1"]
    native, _ = convert_state_dict(ref.state_dict(), SPECS["lowformer_b1"])
    target = tmp_path / ".exp/cls/imagenet/b1/checkpoint/evalmodel.pt"
    target.parent.mkdir(parents=True)
    torch.save({"state_dict": to_official_state_dict(native, SPECS["lowformer_b1"])}, target)
    model = lowformer.create_model("lowformer_b1", pretrained=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert _rel_err(ref(x), model(x)) <= 1e-5


def test_drop_path_follows_official_linear_rule():
    model = lowformer.create_model("lowformer_b0", drop_path_rate=0.1, drop_path_skip=2)
    rates = [
        getattr(getattr(m, a), "drop_prob", 0.0) for m in model.modules() for a in getattr(m, "drop_path_attrs", ())
    ]
    # B0: 3 + 4 LowFormer blocks with attention, MLP and local residuals; conv stages have no residual blocks
    assert len(rates) == 21
    assert rates[:2] == [0.0, 0.0]
    assert rates[2:] == pytest.approx([0.1 * (i + 1) / 19 for i in range(19)])
    x = torch.randn(2, 3, 64, 64)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_user_defined_variant_without_editing_the_library(monkeypatch):
    from lowformer import LowFormer, LowFormerSpec, StageSpec
    from lowformer.models import _registry

    monkeypatch.setattr(_registry, "_REGISTRY", dict(_registry._REGISTRY))  # keep the global registry clean

    spec = LowFormerSpec(
        stem_width=16,
        stages=(
            StageSpec(24, 1),
            StageSpec(32, 2, downsample_expand=6.0),
            StageSpec(48, 1, "attention", attn_stride=2),
            StageSpec(64, 1, "attention", mlp=False, attn_norm=False),
        ),
        head_widths=(128, 160),
    )
    model = LowFormer(spec, num_classes=3).eval()
    assert model(torch.randn(1, 3, 65, 77)).shape == (1, 3)
    assert LowFormerSpec.from_dict(spec.to_dict()) == spec
    lowformer.register_model(
        "test_tiny_lowformer",
        lambda **kw: LowFormer(spec, **kw),
        family="lowformer",
        spec=spec,
        convert=convert_state_dict,
    )
    assert lowformer.create_model("test_tiny_lowformer", num_classes=4).eval()(torch.randn(1, 3, 32, 32)).shape == (
        1,
        4,
    )


def test_spec_validation():
    from lowformer import StageSpec

    with pytest.raises(ValueError, match="kind"):
        StageSpec(32, 1, kind="transformer")
    with pytest.raises(ValueError, match="depth >= 1"):
        StageSpec(32, 0, kind="conv")


def test_unknown_model_suggests_close_names():
    with pytest.raises(ValueError, match="lowformer_b1"):
        lowformer.create_model("lowformer_b11")


def test_saved_checkpoint_is_atomic_and_readable_by_others(tmp_path):
    import os
    import stat

    model = lowformer.create_model("lowformer_b0", num_classes=3)
    old_umask = os.umask(0o022)
    try:
        path = lowformer.save_checkpoint(model, tmp_path / "b0.safetensors")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's private 0600
    assert [p.name for p in tmp_path.iterdir()] == ["b0.safetensors"]  # no temporary file left


# --------------------------------------------------------------------------------------------
# Files that are not usable checkpoints: each gets its own true message, whichever API reads it
# --------------------------------------------------------------------------------------------


def _bad_checkpoints(folder) -> dict:
    """name -> (path, exception type, text the message must contain)."""
    import os

    model = lowformer.create_model("lowformer_b0")
    good_pt, good_st = folder / "good.pt", folder / "good.safetensors"
    torch.save(model.state_dict(), good_pt)
    lowformer.save_checkpoint(model, good_st)
    legacy = folder / "legacy.pt"
    torch.save(model.state_dict(), legacy, _use_new_zipfile_serialization=False)
    files = {}

    def write(name: str, data: bytes) -> object:
        (folder / name).write_bytes(data)
        return folder / name

    pt, st, old = good_pt.read_bytes(), good_st.read_bytes(), legacy.read_bytes()
    files["empty .pt"] = (write("empty.pt", b""), lowformer.CheckpointError, "is empty (0 bytes), not a checkpoint")
    files["empty .safetensors"] = (write("empty.safetensors", b""), lowformer.CheckpointError, "is empty (0 bytes)")
    random_bytes = bytes(range(7, 256)) * 40  # fixed "random" bytes: no magic number of any format
    files["random .pt"] = (write("random.pt", random_bytes), lowformer.CheckpointError, "is not a checkpoint")
    files["random .safetensors"] = (
        write("r.safetensors", os.urandom(8) + b"x" * 99),
        lowformer.CheckpointError,
        "is not a checkpoint",
    )
    files["truncated .pt"] = (write("cut.pt", pt[: len(pt) // 2]), lowformer.CheckpointError, "is truncated or damaged")
    files["truncated legacy .pt"] = (
        write("cut_legacy.pt", old[: len(old) // 2]),
        lowformer.CheckpointError,
        "is truncated",
    )
    files["truncated .safetensors"] = (
        write("cut.safetensors", st[: len(st) // 2]),
        lowformer.CheckpointError,
        "is truncated",
    )
    files["truncated safetensors header"] = (
        write("head.safetensors", st[:40]),
        lowformer.CheckpointError,
        "is truncated",
    )
    (folder / "run").mkdir()
    (folder / "run" / "best.safetensors").write_bytes(st)
    files["a folder"] = (
        folder / "run",
        IsADirectoryError,
        "is a folder, not a file; give the checkpoint file itself; checkpoint files in it: best.safetensors",
    )
    files["missing"] = (folder / "nope.pt", FileNotFoundError, "checkpoint not found")
    ts = folder / "model.torchscript"
    torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2)), ts)
    files["TorchScript"] = (ts, lowformer.CheckpointError, "is a TorchScript module")
    return files


_BAD = [
    "empty .pt",
    "empty .safetensors",
    "random .pt",
    "random .safetensors",
    "truncated .pt",
    "truncated legacy .pt",
    "truncated .safetensors",
    "truncated safetensors header",
    "a folder",
    "missing",
    "TorchScript",
]


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory):
    return _bad_checkpoints(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("case", _BAD)
def test_unusable_checkpoint_has_its_own_message(case, bad_checkpoints):
    path, error, text = bad_checkpoints[case]
    for read in (
        lowformer.read_checkpoint,
        lambda p: lowformer.create_model("lowformer_b0", checkpoint_path=p),
        lowformer.load_model,
        lambda p: lowformer.create_model("timm:resnet18", checkpoint_path=p),
    ):
        with pytest.raises(error) as err:
            read(path)
        assert text in str(err.value) and str(path) in str(err.value)
        assert "code execution" not in str(err.value)


def test_a_safetensors_file_is_recognised_by_its_content_not_its_name(tmp_path):
    src = lowformer.create_model("lowformer_b0", num_classes=4)
    path = lowformer.save_checkpoint(src, tmp_path / "weights.pt")  # the "wrong" suffix
    model = lowformer.create_model("lowformer_b0", checkpoint_path=path)
    assert model.num_classes == 4 and model.pretrained_cfg["checkpoint_format"] == "lowformer safetensors"


# --------------------------------------------------------------------------------------------
# The data config travels with the weights, in both formats
# --------------------------------------------------------------------------------------------

_TRAINED_AT = {
    "input_size": (3, 64, 64),
    "crop_pct": 1.0,
    "crop_mode": "center",
    "interpolation": "bilinear",
    "mean": (0.5, 0.4, 0.3),
    "std": (0.2, 0.25, 0.3),
    "label_names": ["cat", "dog", "fish"],
}


@pytest.mark.parametrize("name", ["lowformer_b0", "edgevit_xxs"])
@pytest.mark.parametrize("container", ["safetensors", "training .pt"])
def test_checkpoint_restores_its_data_config(name, container, tmp_path):
    from timm.data import resolve_data_config

    from lowformer.weights import META_KEY, checkpoint_metadata

    src = lowformer.create_model(name, num_classes=3).eval()
    src.pretrained_cfg = {**src.pretrained_cfg, **_TRAINED_AT}
    if container == "safetensors":
        path = lowformer.save_checkpoint(src, tmp_path / "best.safetensors")
        label = "lowformer safetensors"
    else:  # what the trainer writes: the weights, training state, and the same metadata under "meta"
        path = tmp_path / "best.pt"
        torch.save({"state_dict": src.state_dict(), "epoch": 3, META_KEY: checkpoint_metadata(src)}, path)
        label = "lowformer torch.save"
    for model in (lowformer.load_model(path), lowformer.create_model(name, checkpoint_path=path)):
        cfg = resolve_data_config(model=model)
        assert cfg["input_size"] == (3, 64, 64) and cfg["crop_pct"] == 1.0 and cfg["interpolation"] == "bilinear"
        assert cfg["mean"] == (0.5, 0.4, 0.3) and cfg["std"] == (0.2, 0.25, 0.3)
        assert model.pretrained_cfg["label_names"] == ["cat", "dog", "fish"]
        assert model.pretrained_cfg["checkpoint_format"] == label and model.num_classes == 3
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(src(x), lowformer.load_model(path).eval()(x))
    plain = tmp_path / "plain.pt"  # a bare state dict records nothing: the family's defaults stay
    torch.save(src.state_dict(), plain)
    assert resolve_data_config(model=lowformer.create_model(name, checkpoint_path=plain))["input_size"] == (3, 224, 224)

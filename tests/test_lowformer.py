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

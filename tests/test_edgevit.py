"""EdgeViT family: official numbers, official checkpoint layout, size rule, fixes to the official code."""

import json

import pytest
import torch
from helpers import randomize_bn

import lowformer
from lowformer.measure.macs import count_macs
from lowformer.models import get_entry
from lowformer.models.edgevit import (
    SPECS,
    EdgeViT,
    EdgeViTSpec,
    EdgeViTStageSpec,
    convert_state_dict,
    input_size_divisor,
    key_map,
    to_official_state_dict,
)

# (params, MACs) of the official implementation (saic-fi/edgevit src/edgevit.py) at 224x224,
# batch 1, 1 MAC = 1 fused multiply-add, counted with lowformer.measure.macs on the official model
OFFICIAL = {
    "edgevit_xxs": (4_067_704, 551_262_816),
    "edgevit_xs": (6_770_056, 1_127_815_200),
    "edgevit_s": (13_108_168, 1_911_021_792),
}
NAMES = list(OFFICIAL)


def _official_checkpoint(name: str, num_classes: int = 1000) -> tuple[torch.nn.Module, dict]:
    """A model with non-default BatchNorm statistics and its state dict in the official layout."""
    model = lowformer.create_model(name, num_classes=num_classes).eval()
    randomize_bn(model)
    return model, to_official_state_dict(model.state_dict(), SPECS[name])


@pytest.mark.parametrize("name", NAMES)
def test_params_and_macs_equal_official(name):
    report = count_macs(lowformer.create_model(name), 224)
    params, macs = OFFICIAL[name]
    assert (report.params, report.macs) == (params, macs)
    # the precision quoted in the docs: XXS 4.07M / 551M, XS 6.77M / 1128M, S 13.11M / 1911M
    assert (round(report.params / 1e6, 2), round(report.macs / 1e6)) == (
        {"edgevit_xxs": 4.07, "edgevit_xs": 6.77, "edgevit_s": 13.11}[name],
        {"edgevit_xxs": 551, "edgevit_xs": 1128, "edgevit_s": 1911}[name],
    )
    width = SPECS[name].stages[-1].width
    assert report.params_head == 2 * width + 1000 * width + 1000  # final BatchNorm affine + classifier


def test_paper_figures_are_recorded_as_published():
    assert get_entry("edgevit_xxs").paper == (4.1, 600)
    assert get_entry("edgevit_xs").paper == (6.7, 1100)
    assert get_entry("edgevit_s").paper == (11.1, 1900)  # the released code builds 13.11M: docs/edgevit.md


@pytest.mark.parametrize("name", NAMES)
def test_key_map_is_a_bijection_over_every_tensor(name):
    model = lowformer.create_model(name)
    pairs = key_map(SPECS[name])
    native, official = [p[0] for p in pairs], [p[1] for p in pairs]
    assert set(native) == set(model.state_dict()) and len(native) == len(set(native))
    assert len(official) == len(set(official))
    assert not any(k.startswith("stages.") for k in official)


@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "deit_checkpoint"])
def test_official_layout_loads_strictly(wrapped, tmp_path):
    name = "edgevit_xxs"
    ref, official = _official_checkpoint(name)
    for key in (
        "patch_embed1.proj.weight",
        "blocks1.0.LocalAgg.attn.weight",
        "blocks3.2.SelfAttn.attn.LocalProp.weight",
    ):
        assert key in official
    assert torch.equal(official["norm.running_var"], ref.head.norm.running_var) and "head.weight" in official
    assert "blocks4.0.LocalAgg.pos_embed.weight" not in official  # no local aggregation where r = 1
    path = tmp_path / "checkpoint.pth"
    # the DeiT-based training script saves {"model": state_dict, "optimizer": ..., "epoch": ...}
    torch.save({"model": official, "optimizer": {"state": {}}, "epoch": 299} if wrapped else official, path)
    ours = lowformer.create_model(name, checkpoint_path=path).eval()
    assert ours.pretrained_cfg["checkpoint_format"] == "official"
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))
        assert torch.equal(ours.head.norm.running_mean, ref.head.norm.running_mean)


def test_official_layout_roundtrip_for_every_variant():
    for name in NAMES:
        native = lowformer.create_model(name).state_dict()
        back, fmt = convert_state_dict(to_official_state_dict(native, SPECS[name]), SPECS[name])
        assert fmt == "official"
        assert list(back) == list(native) and all(back[k] is native[k] for k in native)


def test_convert_is_pure_and_idempotent():
    spec = SPECS["edgevit_xs"]
    native = lowformer.create_model("edgevit_xs").state_dict()
    out, fmt = convert_state_dict(native, spec)
    assert fmt == "native" and out is native
    official = to_official_state_dict(native, spec)
    keys_before = list(official)
    once, _ = convert_state_dict(official, spec)
    assert list(official) == keys_before  # input untouched
    twice, fmt = convert_state_dict(once, spec)
    assert fmt == "native" and twice is once


def test_checkpoint_classes_are_kept(tmp_path):
    _, official = _official_checkpoint("edgevit_xxs", num_classes=37)
    path = tmp_path / "pets.pth"
    torch.save({"model": official}, path)
    assert lowformer.create_model("edgevit_xxs", checkpoint_path=path).num_classes == 37


def test_wrong_variant_is_a_loud_error(tmp_path):
    _, official = _official_checkpoint("edgevit_s")
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": official}, path)
    with pytest.raises(lowformer.CheckpointError) as err:
        lowformer.create_model("edgevit_xs", checkpoint_path=path)  # same widths, other depths
    msg = str(err.value)
    assert "detected format: official" in msg and "unexpected keys" in msg and "blocks2.1." in msg


def test_missing_key_is_a_loud_error(tmp_path):
    _, official = _official_checkpoint("edgevit_xxs")
    del official["blocks3.1.SelfAttn.attn.qkv.bias"]
    path = tmp_path / "checkpoint.pth"
    torch.save(official, path)
    with pytest.raises(lowformer.CheckpointError, match=r"missing keys: stages\.2\.blocks\.1\.attn\.qkv\.bias"):
        lowformer.create_model("edgevit_xxs", checkpoint_path=path)


def test_unknown_layout_is_an_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(lowformer.CheckpointError, match="not an EdgeViT state dict"):
        lowformer.create_model("edgevit_xxs", checkpoint_path=path)


def test_pretrained_says_no_weights_exist(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWFORMER_WEIGHTS", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        lowformer.create_model("edgevit_s", pretrained=True)
    msg = str(err.value)
    assert "no pretrained weights exist for edgevit_s" in msg
    assert "have not released trained weights" in msg and "checkpoint_path" in msg


def test_any_multiple_of_32_works():
    model = lowformer.create_model("edgevit_xxs", num_classes=3).eval()
    x = torch.randn(1, 3, 256, 320)
    with torch.no_grad():
        assert model(x).shape == (1, 3)
        feats = model.forward_intermediates(x, intermediates_only=True)
    assert [f.shape[-2:] for f in feats] == [(64, 80), (32, 40), (16, 20), (8, 10)]
    assert all(f.is_contiguous() for f in feats)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)  # stage 4 on a 1x1 grid


@pytest.mark.parametrize("size", [(224, 200), (240, 224), (100, 100)])
def test_other_sizes_are_a_clear_error(size):
    model = lowformer.create_model("edgevit_xxs").eval()
    x = torch.randn(1, 3, *size)
    pattern = f"edgevit_xxs needs height and width that are multiples of 32, got {size[0]}x{size[1]}"
    with pytest.raises(ValueError, match=pattern):
        model(x)
    with pytest.raises(ValueError, match=pattern):
        model.forward_intermediates(x)


def test_reset_classifier_sizes_from_last_stage():
    # the official reset_classifier builds nn.Linear(list_of_widths, n) and raises
    model = lowformer.create_model("edgevit_xs").eval()
    model.reset_classifier(10)
    assert model.get_classifier().in_features == 384 and model.num_classes == 10
    assert model.pretrained_cfg["num_classes"] == 10
    x = torch.randn(1, 3, 64, 64)
    assert model(x).shape == (1, 10)
    model.reset_classifier(0)
    assert model(x).shape == (1, 384)
    with pytest.raises(ValueError, match="average"):
        model.reset_classifier(10, global_pool="max")


def test_drop_path_follows_official_per_block_rule():
    model = lowformer.create_model("edgevit_s", drop_path_rate=0.1)
    blocks = [b for stage in model.stages for b in stage.blocks]
    assert len(blocks) == 11
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in blocks]
    assert rates == pytest.approx([0.1 * i / 10 for i in range(11)])
    for b, r in zip(blocks, rates, strict=True):
        # one rate for every residual branch of a block, the local aggregation's included
        if r > 0 and not isinstance(b.local_agg, torch.nn.Identity):
            assert b.local_agg.drop_path1.drop_prob == b.local_agg.drop_path2.drop_prob == r


def test_spec_is_data():
    spec = SPECS["edgevit_s"]
    assert EdgeViTSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert [s.num_heads for s in spec.stages] == [1, 2, 5, 8]
    assert [s.local_agg for s in spec.stages] == [True, True, True, False]
    assert input_size_divisor(spec) == 32 == get_entry("edgevit_s").size_divisor
    with pytest.raises(ValueError, match="num_heads"):
        EdgeViTStageSpec(width=100, depth=1, num_heads=3)


def test_user_defined_variant():
    spec = EdgeViTSpec(
        stages=(
            EdgeViTStageSpec(16, 1, num_heads=1, patch_size=4, attn_stride=2),
            EdgeViTStageSpec(32, 2, num_heads=2, patch_size=2, attn_stride=1, local_agg=False),
        )
    )
    assert input_size_divisor(spec) == 8
    model = EdgeViT(spec, num_classes=4).eval()
    assert [f["reduction"] for f in model.feature_info] == [4, 8]
    assert model(torch.randn(1, 3, 40, 32)).shape == (1, 4)
    with pytest.raises(ValueError, match="multiples of 8"):
        model(torch.randn(1, 3, 36, 32))
    with pytest.raises(ValueError, match="too small .* >= 32"):  # the one minimum, whatever the spec's strides
        model(torch.randn(1, 3, 40, 24))

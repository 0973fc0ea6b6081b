"""Checks every registered variant gets, whatever its family (timm's tests/test_models.py style)."""

import pytest
import torch
from helpers import randomize_bn
from timm.data import resolve_data_config

import lowformer
from lowformer.factory import MIN_IMAGE_SIZE, check_image_size
from lowformer.models import get_entry

MODELS = lowformer.list_models()
SMALL = 64  # a multiple of 32, so every family accepts it


def test_registry_lists_all_variants():
    expected = {
        "lowformer_b0",
        "lowformer_b1",
        "lowformer_b15",
        "lowformer_b3",
        "lowformer_e1",
        "lowformer_e2",
        "lowformer_e3",
    }
    assert expected <= set(MODELS)
    assert lowformer.list_models("lowformer_e*") == ["lowformer_e1", "lowformer_e2", "lowformer_e3"]


@pytest.mark.parametrize("name", MODELS)
def test_forward_backward(name):
    model = lowformer.create_model(name, num_classes=10).train()
    x = torch.randn(2, 3, SMALL, SMALL)
    out = model(x)
    assert out.shape == (2, 10)
    out.logsumexp(1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads), "every parameter takes part in the forward pass"
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", MODELS)
def test_features_and_intermediates(name):
    model = lowformer.create_model(name, num_classes=10).eval()
    randomize_bn(model)
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        features = model.forward_features(x)
        only = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
    assert len(inter) == len(model.feature_info)
    for f, info in zip(inter, model.feature_info):
        assert f.shape[1] == info["num_chs"]
        assert f.shape[2:] == (96 // info["reduction"], 128 // info["reduction"])
    assert torch.equal(final, features)
    assert torch.equal(inter[-1], features)
    assert torch.equal(only[0], inter[0]) and torch.equal(only[1], inter[2])
    assert model.num_features == model.feature_info[-1]["num_chs"]
    with torch.no_grad():
        assert torch.allclose(model.forward_head(features), model(x))
        assert model.forward_head(features, pre_logits=True).shape == (1, model.head_hidden_size)


@pytest.mark.parametrize("name", MODELS)
def test_reset_classifier(name):
    model = lowformer.create_model(name).eval()
    assert model.get_classifier().out_features == 1000
    model.reset_classifier(7)
    x = torch.randn(1, 3, SMALL, SMALL)
    assert model(x).shape == (1, 7) and model.num_classes == 7
    model.reset_classifier(0)
    assert model(x).shape == (1, model.head_hidden_size)


@pytest.mark.parametrize("name", MODELS)
def test_features_only(name, tmp_path):
    ref = lowformer.create_model(name).eval()
    randomize_bn(ref)
    path = lowformer.save_checkpoint(ref, tmp_path / "w.safetensors")
    feat = lowformer.create_model(name, checkpoint_path=path, features_only=True, out_indices=(1, 3)).eval()
    x = torch.randn(1, 3, SMALL, SMALL)
    with torch.no_grad():
        maps = feat(x)
        want = ref.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    assert feat.feature_info.channels() == [ref.feature_info[1]["num_chs"], ref.feature_info[3]["num_chs"]]
    assert feat.feature_info.reduction() == [ref.feature_info[1]["reduction"], ref.feature_info[3]["reduction"]]
    assert [m.shape for m in maps] == [w.shape for w in want]
    assert all(torch.equal(a, b) for a, b in zip(maps, want))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_finite(name, dtype):
    model = lowformer.create_model(name, num_classes=10).train()
    x = torch.randn(2, 3, SMALL, SMALL) * 3
    with torch.autocast("cpu", dtype=dtype):
        out = model(x)
    assert torch.isfinite(out).all()
    out.float().logsumexp(1).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", MODELS)
def test_input_sizes(name):
    entry = get_entry(name)
    model = lowformer.create_model(name, num_classes=10).eval()
    with torch.no_grad():
        if entry.size_divisor == 1:
            for h, w in [(97, 131), (32, 32), (33, 45)]:
                assert model(torch.randn(1, 3, h, w)).shape == (1, 10)
                feats = model.forward_intermediates(torch.randn(1, 3, h, w), intermediates_only=True)
                assert feats[-1].shape[-2:] == (-(-h // 32), -(-w // 32))  # ceil: every stride-2 step rounds up
        else:
            d = entry.size_divisor
            assert model(torch.randn(1, 3, 2 * d, 3 * d)).shape == (1, 10)
            with pytest.raises(ValueError, match=str(d)):
                model(torch.randn(1, 3, 97, 131))


@pytest.mark.parametrize("name", MODELS)
def test_metadata_for_timm_data_pipeline(name):
    model = lowformer.create_model(name)
    cfg = resolve_data_config(model=model)
    assert cfg["input_size"] == (3, 224, 224)
    assert cfg["interpolation"] in ("bicubic", "bilinear")
    assert 0.8 <= cfg["crop_pct"] <= 1.0
    assert len(cfg["mean"]) == 3 and len(cfg["std"]) == 3


@pytest.mark.parametrize("name", MODELS)
def test_grad_checkpointing_same_result(name):
    model = lowformer.create_model(name, num_classes=10).eval()
    x = torch.randn(1, 3, SMALL, SMALL, requires_grad=True)
    ref = model(x)
    model.set_grad_checkpointing(True)
    out = model(x)
    assert torch.allclose(ref, out)


@pytest.mark.parametrize("name", MODELS)
def test_safetensors_roundtrip(name, tmp_path):
    model = lowformer.create_model(name, num_classes=5).eval()
    randomize_bn(model)
    path = lowformer.save_checkpoint(model, tmp_path / f"{name}.safetensors")
    again = lowformer.create_model(name, checkpoint_path=path).eval()
    assert again.num_classes == 5
    x = torch.randn(1, 3, SMALL, SMALL)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
        assert torch.equal(model(x), lowformer.load_model(path).eval()(x))


@pytest.mark.parametrize("name", MODELS)
def test_unknown_argument_is_an_error(name):
    with pytest.raises(TypeError):
        lowformer.create_model(name, not_an_option=1)


@pytest.mark.parametrize("name", MODELS)
def test_pretrained_without_local_file_says_what_to_do(name, tmp_path, monkeypatch):
    monkeypatch.setenv("LOWFORMER_WEIGHTS", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        lowformer.create_model(name, pretrained=True)
    assert name in str(err.value)


@pytest.mark.parametrize("name", MODELS)
def test_bad_inputs_and_indices_are_one_clear_error(name):
    """Every model refuses what `check_image_size` (info, export, bench, train) refuses, with the same
    message; a non-4D input and bad feature indices get the same message whatever the family."""
    model = lowformer.create_model(name, num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, MIN_IMAGE_SIZE, MIN_IMAGE_SIZE)).shape == (1, 3)
        for size in [(31, 64), (64, 16), (64, 48)]:
            try:
                check_image_size(name, size)
            except ValueError as e:
                with pytest.raises(ValueError) as err:
                    model(torch.randn(1, 3, *size))
                assert str(err.value) == str(e)
            else:  # 64x48 passes for LowFormer (any size >= 32)
                assert model(torch.randn(1, 3, *size)).shape == (1, 3)
    for shape, hint in [
        ((3, 64, 64), " (add the batch dimension: x.unsqueeze(0))"),
        ((1, 1, 3, 64, 64), ""),
        ((2, 64), ""),
    ]:
        want = f"{name} takes a 4D input (batch, channels, height, width), got shape {shape}{hint}"
        for call in (model, model.forward_features, model.forward_intermediates):
            with pytest.raises(ValueError) as err:
                call(torch.randn(*shape))
            assert str(err.value) == want
    for indices in [[4], [], [1, 1], [3, 1]]:
        with pytest.raises(ValueError, match="valid indices: 0 to 3 "):
            model.forward_intermediates(torch.randn(1, 3, SMALL, SMALL), indices=indices)


@pytest.mark.parametrize("name", ["lowformer_b0", "edgevit_xxs"])
@pytest.mark.parametrize(
    "out_indices, problem",
    [
        ((4,), "4 out of range"),
        ((-5, 1), "-5 out of range"),
        ((), "is empty"),
        ((1, 1), "twice"),
        ((3, 1), "ascending"),
    ],
)
def test_features_only_bad_out_indices_list_the_valid_ones(name, out_indices, problem):
    with pytest.raises(ValueError) as err:
        lowformer.create_model(name, features_only=True, out_indices=out_indices)
    assert problem in str(err.value) and "valid indices: 0 to 3 (or -4 to -1), ascending, each once" in str(err.value)


@pytest.mark.parametrize("name", ["lowformer_b0", "edgevit_xxs"])
def test_features_follow_feature_info_and_keep_the_data_config(name):
    feat = lowformer.create_model(name, features_only=True, out_indices=(-3, -1)).eval()
    with torch.no_grad():
        maps = feat(torch.randn(1, 3, SMALL, SMALL))
    assert [m.shape[1] for m in maps] == feat.feature_info.channels()
    assert [SMALL // m.shape[-1] for m in maps] == feat.feature_info.reduction() == [8, 32]
    last2 = lowformer.create_model(name, features_only=True, out_indices=2)  # an int: the last n
    assert last2.feature_info.reduction() == [16, 32]
    assert resolve_data_config(model=feat) == resolve_data_config(model=lowformer.create_model(name))

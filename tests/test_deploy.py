"""Deploy mode computes the same function, for every registered variant and input size class."""

import importlib

import pytest
import torch
from helpers import randomize_bn
from timm.utils import reparameterize_model

import lowformer
from lowformer import onednn
from lowformer.deploy import deploy
from lowformer.models import get_entry

MODELS = lowformer.list_models()


def _nondefault(model: torch.nn.Module) -> torch.nn.Module:
    """Random BatchNorm statistics and Group/LayerNorm affines: folding must get them all right."""
    randomize_bn(model)
    g = torch.Generator().manual_seed(2)
    for m in model.modules():
        if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None:
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
    return model


def _sizes(name):
    if get_entry(name).size_divisor == 32:
        return [(64, 64), (64, 96)]
    return [(64, 64), (64, 96), (97, 131)]


def _rel(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


@pytest.mark.parametrize("name", MODELS)
def test_deploy_is_equivalent_and_idempotent(name):
    model = _nondefault(lowformer.create_model(name).eval())
    fast = deploy(model)
    again = deploy(fast)
    assert fast is not model
    assert not any(isinstance(m, torch.nn.Dropout) for m in fast.modules())
    for h, w in _sizes(name):
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            ref, out = model(x), fast(x)
            assert _rel(ref, out) <= 1e-5, (h, w)
            assert torch.equal(out, again(x))
            assert (
                _rel(
                    model.forward_head(model.forward_features(x), pre_logits=True),
                    fast.forward_head(fast.forward_features(x), pre_logits=True),
                )
                <= 1e-5
            )
    assert fast.state_dict().keys() == again.state_dict().keys()


@pytest.mark.parametrize("name", ["lowformer_b1", "lowformer_e3", "edgevit_xs"])
def test_no_batchnorm_left_in_lowformer_and_timm_finds_the_methods(name):
    model = _nondefault(lowformer.create_model(name).eval())
    via_timm = reparameterize_model(model)
    ours = deploy(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert _rel(model(x), via_timm(x)) <= 1e-5
        assert _rel(ours(x), via_timm(x)) <= 1e-5
        # the same folding, the same plain kernels: only summation order differs
        assert _rel(deploy(model, memory_format="keep")(x), via_timm(x)) <= 1e-6
    if name.startswith("lowformer"):
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in ours.modules())


@pytest.mark.parametrize("name", ["lowformer_b0", "edgevit_xxs"])
def test_deploy_features_only(name, tmp_path):
    ref = _nondefault(lowformer.create_model(name).eval())
    path = lowformer.save_checkpoint(ref, tmp_path / "w.safetensors")
    feat = lowformer.create_model(name, checkpoint_path=path, features_only=True, out_indices=(0, 2, 3)).eval()
    fast = deploy(feat)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        for a, b in zip(feat(x), fast(x)):
            assert _rel(a, b) <= 1e-5


def test_deploy_refuses_training_mode_and_unfoldable_parts():
    model = lowformer.create_model("lowformer_b0")
    with pytest.raises(ValueError, match=r"model.eval\(\)"):
        deploy(model)
    model.eval()
    model.stem.conv.norm = torch.nn.BatchNorm2d(16, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="running statistics"):
        deploy(model)


def test_root_reparameterize_in_place():
    model = _nondefault(lowformer.create_model("lowformer_b0").eval())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        model.reparameterize()
        assert _rel(ref, model(x)) <= 1e-5


def _stem_weight(model: torch.nn.Module) -> torch.Tensor:
    return next(m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d))


def test_deploy_layout_choices():
    model = _nondefault(lowformer.create_model("lowformer_b0").eval())
    x = torch.randn(2, 3, 64, 64)
    auto = "packed" if onednn.available() else "channels_last"
    with torch.no_grad():
        ref = model(x)
        for fmt, packed, channels_last in [
            ("auto", auto == "packed", True),
            ("channels_last", False, True),
            ("contiguous", False, False),
            ("keep", False, False),
        ]:
            fast = deploy(model, memory_format=fmt)
            assert any(isinstance(m, onednn.PACKED_LAYERS) for m in fast.modules()) == packed, fmt
            assert _stem_weight(fast).is_contiguous(memory_format=torch.channels_last) == channels_last, fmt
            assert _stem_weight(fast).is_contiguous() != channels_last, fmt
            assert _rel(ref, fast(x)) <= 1e-5, fmt
            assert _rel(ref, fast(x.contiguous(memory_format=torch.channels_last))) <= 1e-5, fmt
    # the model passed in is never changed unless inplace=True
    assert _stem_weight(model).is_contiguous() and not isinstance(model.stem.conv.conv, onednn.PACKED_LAYERS)
    with pytest.raises(ValueError, match="memory_format must be one of"):
        deploy(model, memory_format="nhwc")
    if onednn.available():
        with pytest.raises(ValueError, match="already packed"):
            deploy(deploy(model, memory_format="packed"), memory_format="contiguous")


def test_deploy_tune_times_the_candidates_and_applies_the_fastest(monkeypatch):
    deploy_module = importlib.import_module("lowformer.deploy.mode")  # `lowformer.deploy` is the function

    model = _nondefault(lowformer.create_model("lowformer_b0").eval())
    x = torch.randn(1, 3, 64, 64)
    folded = deploy(model, memory_format="keep")
    assert deploy_module.tune_layout(folded, x, rounds=2) in deploy_module.layouts("cpu")
    assert _stem_weight(folded).is_contiguous()  # candidates are copies
    monkeypatch.setattr(deploy_module, "tune_layout", lambda m, x: "contiguous")
    assert _stem_weight(deploy(model, memory_format="tune", example_input=x)).is_contiguous()
    monkeypatch.setattr(deploy_module, "tune_layout", lambda m, x: "channels_last")
    fast = deploy(model, memory_format="tune", example_input=x)
    assert _stem_weight(fast).is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert _rel(model(x), fast(x)) <= 1e-5


@pytest.mark.parametrize("stride", [2, 4])
def test_cell_spread_is_the_depthwise_transposed_conv(stride):
    """EdgeViT's delegate spread (kernel = stride, depthwise) as a broadcast product: same outputs,
    same parameters, any input memory format."""
    from lowformer.models.edgevit import CellSpread

    conv = torch.nn.ConvTranspose2d(24, 24, stride, stride=stride, groups=24).eval()
    spread = CellSpread(conv)
    assert dict(spread.named_parameters()).keys() == dict(conv.named_parameters()).keys()
    x = torch.randn(2, 24, 5, 7)
    with torch.no_grad():
        for inp in (x, x.contiguous(memory_format=torch.channels_last), x.permute(0, 2, 3, 1).permute(0, 3, 1, 2)):
            assert _rel(conv(inp), spread(inp)) <= 1e-6
    with pytest.raises(ValueError, match="kernel = stride"):
        CellSpread(torch.nn.ConvTranspose2d(24, 24, 4, stride=2, padding=1, groups=24))

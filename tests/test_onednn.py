"""Pre-packed oneDNN convolutions compute exactly what the torch layers compute, and step aside
wherever the packed op is not the layer's function (autograd, tracing, MAC counting)."""

import copy
import io

import pytest
import torch
from helpers import randomize_bn
from torch import nn

import lowformer
from lowformer import onednn
from lowformer.deploy import deploy
from lowformer.measure.macs import count_macs

pytestmark = pytest.mark.skipif(not onednn.available(), reason="this PyTorch build has no oneDNN")


def _rel(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


CONVS = [
    dict(in_channels=16, out_channels=32, kernel_size=3, padding=1),
    dict(in_channels=32, out_channels=16, kernel_size=1, bias=False),
    dict(in_channels=24, out_channels=24, kernel_size=5, stride=2, padding=2, groups=24),
    dict(in_channels=8, out_channels=16, kernel_size=3, stride=2, padding=1),
]


@pytest.mark.parametrize("kwargs", CONVS)
@pytest.mark.parametrize("act", [None, nn.Hardswish(), nn.GELU(), nn.ReLU()])
@pytest.mark.parametrize("channels_last", [False, True])
def test_packed_conv_matches_conv(kwargs, act, channels_last):
    conv = nn.Conv2d(**kwargs).eval()
    ref_act = act if act is not None else nn.Identity()
    packed = onednn.PackedConv2d.from_conv(copy.deepcopy(conv), act=act)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for shape in [(2, kwargs["in_channels"], 17, 23), (1, kwargs["in_channels"], 8, 8)]:
        x = torch.randn(shape).contiguous(memory_format=fmt)
        with torch.no_grad():
            out = packed(x)
            assert _rel(ref_act(conv(x)), out) <= 1e-6
            # the packed op always answers in channels_last (deploy relies on it)
            assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("stride,kernel,padding", [(2, 4, 1), (1, 3, 1), (4, 8, 2)])
def test_packed_transposed_conv_matches(stride, kernel, padding):
    conv = nn.ConvTranspose2d(32, 16, kernel, stride=stride, padding=padding).eval()
    packed = onednn.PackedConvTranspose2d.from_conv(copy.deepcopy(conv))
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 32, 7, 9).contiguous(memory_format=fmt)
        with torch.no_grad():
            assert _rel(conv(x), packed(x)) <= 1e-6


def test_plain_path_where_the_packed_op_would_be_wrong():
    conv = nn.Conv2d(8, 8, 3, padding=1)
    packed = onednn.PackedConv2d.from_conv(copy.deepcopy(conv), act=nn.Hardswish())
    x = torch.randn(1, 8, 10, 10, requires_grad=True)
    out = packed(x)  # autograd on: the plain op, so gradients flow
    out.sum().backward()
    assert x.grad is not None and packed.weight.grad is not None
    assert _rel(nn.functional.hardswish(conv(x)), out) <= 1e-6
    with torch.no_grad():  # float64 has no packed kernel here: plain op too
        x64 = x.detach().double()
        assert packed.double()(x64).dtype == torch.float64


def test_cache_follows_weight_changes():
    conv = nn.Conv2d(4, 4, 3, padding=1).eval()
    packed = onednn.PackedConv2d.from_conv(copy.deepcopy(conv))
    x = torch.randn(1, 4, 9, 9)
    with torch.no_grad():
        packed(x)  # packs the weight
        other = nn.Conv2d(4, 4, 3, padding=1)
        packed.load_state_dict(other.state_dict())
        assert _rel(other(x), packed(x)) <= 1e-6


def test_cache_packs_per_input_shape():
    """oneDNN packs a weight for one input shape; another shape gets its own packing (the last
    MAX_SHAPES are kept), and every shape computes what the conv computes."""
    conv = nn.Conv2d(8, 8, 3, padding=1).eval()
    packed = onednn.PackedConv2d.from_conv(copy.deepcopy(conv))
    shapes = [(4, 8, 12, 12), (1, 8, 12, 12), (1, 8, 20, 20), (2, 8, 9, 9), (3, 8, 7, 7), (1, 8, 12, 12)]
    with torch.no_grad():
        for shape in shapes:
            x = torch.randn(shape)
            assert _rel(conv(x), packed(x)) <= 1e-5
    kept = list(packed._packed)
    assert len(kept) == onednn.PackedConv2d.MAX_SHAPES
    assert kept[-1] == (1, 8, 12, 12) and (4, 8, 12, 12) not in kept  # used last; least recently used out
    first = packed._packed[(1, 8, 12, 12)][1]
    with torch.no_grad():
        packed(torch.randn(1, 8, 12, 12))
    assert packed._packed[(1, 8, 12, 12)][1] is first  # a hit does not pack again


def test_deploy_inside_inference_mode():
    """A model deployed under `torch.inference_mode` has inference-tensor weights (no version
    counter); its packed convs must still run, and compute what the plain model computes."""
    torch.manual_seed(0)
    model = lowformer.create_model("lowformer_b0", num_classes=10).eval()
    randomize_bn(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        expected = model(x)
        deployed = deploy(copy.deepcopy(model))
        assert any(isinstance(m, onednn.PACKED_LAYERS) for m in deployed.modules())
        assert _rel(expected, deployed(x)) <= 1e-5
        assert _rel(expected, deployed(x)) <= 1e-5  # the cached packed weights


@pytest.mark.parametrize("name", ["lowformer_b0", "lowformer_e3", "edgevit_xxs"])
def test_deployed_packed_model_behaves_like_the_plain_one(name, tmp_path):
    model = lowformer.create_model(name).eval()
    randomize_bn(model)
    plain = deploy(model, memory_format="contiguous")
    packed = deploy(model, memory_format="packed")
    assert any(isinstance(m, onednn.PackedConv2d) for m in packed.modules())
    assert plain.state_dict().keys() == packed.state_dict().keys()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref = plain(x)
        assert _rel(ref, packed(x)) <= 1e-5
        # copies, pickles and traces drop the packed cache or run the plain op
        assert _rel(ref, copy.deepcopy(packed)(x)) <= 1e-5
        buf = io.BytesIO()
        torch.save(packed.state_dict(), buf)
        assert _rel(ref, torch.jit.trace(packed, x)(x)) <= 1e-5
    # the MAC counter sees the convolutions (packed layers run the plain op under analysis)
    assert count_macs(packed, (64, 96)).macs == count_macs(plain, (64, 96)).macs
    saved = lowformer.save_checkpoint(packed, tmp_path / "deployed.safetensors")
    assert saved.exists()


def test_deploy_prepacks_on_cpu_only_by_default():
    model = lowformer.create_model("lowformer_b0").eval()
    assert any(isinstance(m, onednn.PackedConv2d) for m in deploy(model).modules())
    assert not any(isinstance(m, onednn.PackedConv2d) for m in deploy(model, memory_format="keep").modules())
    # idempotent: a second deploy packs nothing new and keeps outputs bit-identical
    once = deploy(model)
    twice = deploy(once)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(once(x), twice(x))


class _ConvAct(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.act = nn.Hardswish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class _Declares(_ConvAct):
    def conv_act_pairs(self) -> list[tuple[str, str]]:
        return [("conv", "act")]


def test_fusion_is_the_blocks_answer():
    """pack_convs fuses only the pairs a block declares; it knows no block class."""
    x = torch.randn(1, 4, 9, 9)
    for cls, fused in [(_Declares, True), (_ConvAct, False)]:
        block = cls().eval()
        with torch.no_grad():
            ref = block(x)
            assert onednn.pack_convs(block) == 1 and isinstance(block.conv, onednn.PackedConv2d)
            assert isinstance(block.conv.act, nn.Hardswish) == fused and isinstance(block.act, nn.Identity) == fused
            assert _rel(ref, block(x)) <= 1e-6
    packed = deploy(lowformer.create_model("lowformer_b0").eval(), memory_format="packed")
    mlps = [b.mlp for stage in packed.stages for b in stage.blocks if getattr(b, "mlp", None) is not None]
    assert mlps and all(isinstance(m.fc1.act, nn.GELU) and isinstance(m.act, nn.Identity) for m in mlps)

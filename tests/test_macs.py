"""The MAC counter against closed-form formulas and torch's own flop counter."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lowformer.measure.macs import count_macs
from lowformer.models.lowformer import Lowtention


class _Wrap(nn.Module):
    """Feeds the counter's zeros input of shape (1, C, H, W) into an arbitrary function."""

    def __init__(self, fn, *mods):
        super().__init__()
        self.mods = nn.ModuleList(mods)
        self.fn = fn

    def forward(self, x):
        return self.fn(x, *self.mods)


def _count(fn, *mods, size=(10, 12), chans=8):
    return count_macs(_Wrap(fn, *mods), size, in_chans=chans)


def test_dense_conv():
    r = _count(lambda x, c: c(x), nn.Conv2d(8, 16, 3, padding=1))
    assert r.by_op["conv"] == 16 * 10 * 12 * 8 * 9 and r.macs == r.by_op["conv"]


def test_strided_grouped_and_depthwise_conv():
    r = _count(lambda x, c: c(x), nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8))
    assert r.by_op["depthwise_conv"] == 8 * 5 * 6 * 9 and r.by_op["conv"] == 0
    r = _count(lambda x, c: c(x), nn.Conv2d(8, 16, 3, padding=1, groups=2))
    assert r.by_op["conv"] == 16 * 10 * 12 * 4 * 9


def test_transposed_conv_counts_input_pixels():
    r = _count(lambda x, c: c(x), nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1), size=(5, 6))
    assert r.by_op["transposed_conv"] == 8 * 5 * 6 * 4 * 16
    r = _count(lambda x, c: c(x), nn.ConvTranspose2d(8, 8, 4, stride=2, padding=1, groups=8), size=(5, 6))
    assert r.by_op["transposed_conv"] == 8 * 5 * 6 * 1 * 16


def test_linear_and_matmul():
    r = _count(lambda x, fc: fc(x.mean((2, 3))), nn.Linear(8, 7))
    assert r.by_op["linear"] == 8 * 7 and r.by_op["attention_matmul"] == 0
    r = _count(lambda x, fc: fc(x.flatten(2).transpose(1, 2)), nn.Linear(8, 7))
    assert r.by_op["linear"] == 120 * 8 * 7

    def attn(x):
        t = x.flatten(2).transpose(1, 2)  # (1, 120, 8)
        return (t @ t.transpose(1, 2)).softmax(-1) @ t

    r = _count(attn)
    assert r.by_op["attention_matmul"] == 2 * 120 * 120 * 8
    assert "softmax" in r.uncounted


def test_scaled_dot_product_attention_on_cpu():
    def attn(x):
        t = x.flatten(2).reshape(1, 2, 4, 120).transpose(-1, -2)  # (1, heads=2, 120 tokens, 4)
        return F.scaled_dot_product_attention(t, t, t)

    r = _count(attn)
    assert r.by_op["attention_matmul"] == 2 * 120 * 120 * (4 + 4)


@pytest.mark.parametrize("stride", [1, 2])
def test_lowtention_closed_form(stride):
    dim, size = 128, 14
    m = Lowtention(dim, stride=stride)
    heads, hd = m.num_heads, m.head_dim
    h = -(-size // stride)
    k = 5 if stride > 1 else 3
    up_k = 2 * stride if stride > 1 else 3
    r = count_macs(m, size, in_chans=dim)
    assert r.by_op["depthwise_conv"] == dim * h * h * k * k
    assert r.by_op["conv"] == 3 * heads * hd * dim * h * h
    assert r.by_op["attention_matmul"] == heads * (h * h) ** 2 * 2 * hd
    assert r.by_op["transposed_conv"] == heads * hd * h * h * dim * up_k * up_k


def test_agrees_with_torch_flop_counter_on_convs_and_linears():
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16),
        nn.Conv2d(16, 32, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    ours = count_macs(model, 32)
    with FlopCounterMode(display=False) as fc:
        model.eval()(torch.zeros(1, 3, 32, 32))
    assert 2 * ours.macs == fc.get_total_flops()
    assert {"native_batch_norm", "relu"} <= set(ours.uncounted)


class _WithHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 4, 1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def test_training_state_restored_and_params_split():
    model = _WithHead().train()
    r = count_macs(model, 8)
    assert (r.params, r.params_head, r.params_backbone) == (16 + 10, 10, 16)
    assert r.macs == 4 * 3 * 64 + 4 * 2
    assert model.training

"""Reconstruction units that match the blocks of depthwise-separable nets: an inverted residual with its
squeeze-excite inside is one BRECQ unit; a block called with constant keyword arguments that do not change its
eval output (efficientnet_pytorch's drop_connect_rate) is too, and one whose keyword changes it falls back to its
layers."""
from functools import partial

import pytest
import torch
from torch import nn

import zsq_fast
from conftest import bn_statistics_from_noise

pytestmark = pytest.mark.usefixtures("one_thread")


class Block(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)
        self.relu = nn.ReLU()

    def forward(self, x, drop_rate=None, gain=1.0):
        y = self.b(self.relu(self.a(x))) * gain
        if drop_rate and self.training:
            y = nn.functional.dropout(y, drop_rate)
        return x + y


class Net(nn.Module):
    def __init__(self, body, kwargs):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body, self.kwargs = body, kwargs
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.body(self.stem(x), **self.kwargs).mean((2, 3)))


def _units(model):
    torch.manual_seed(0)
    bn_statistics_from_noise(model, (8, 3, 8, 8))
    q = zsq_fast.quantize(model, torch.randn(8, 3, 8, 8), "W4A8", method="brecq", iterations=2, batch_size=8)
    return [(u["name"], u["kind"]) for u in q.quant_config["units"]]


def test_inverted_residual_with_squeeze_excite_is_one_unit():
    timm = pytest.importorskip("timm")
    from timm.models._efficientnet_blocks import InvertedResidual, SqueezeExcite

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.ir = InvertedResidual(8, 8, exp_ratio=2.0, se_layer=partial(SqueezeExcite, rd_ratio=0.5),
                                       norm_layer=timm.layers.BatchNormAct2d)

        def forward(self, x):
            return self.ir(x)
    units = _units(Net(Wrap(), {}))
    assert ("body", "block") in units and not [u for u in units if u[0].startswith("body.")], units


def test_a_constant_keyword_that_does_not_matter_in_eval_keeps_the_block():
    assert ("body", "block") in _units(Net(Block(), {"drop_rate": 0.2}))


def test_a_keyword_that_changes_the_output_falls_back_to_layers():
    units = _units(Net(Block(), {"gain": 2.0}))
    assert ("body.a", "layer") in units and ("body.b", "layer") in units and ("body", "block") not in units

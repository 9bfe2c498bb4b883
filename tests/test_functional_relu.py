"""hw: a functional ReLU (F.relu, torch.relu, Tensor.relu, in place or not) after a layer is fused into that layer's
site, as integer kernels fuse it into the requantization: one unsigned grid, used by the layers that read the
ReLU's output. It used to be quantized twice: signed at the layer's output (half the levels wasted on values the
ReLU zeroes), then unsigned at the next layer's input."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zsq_fast
from conftest import bn_statistics_from_noise

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

RELUS = {
    "F.relu": lambda t: F.relu(t),
    "F.relu inplace": lambda t: F.relu(t, inplace=True),
    "torch.relu": torch.relu,
    "Tensor.relu_": lambda t: t.relu_(),
}


class FunctionalNet(nn.Module):
    """conv -> BN -> functional ReLU -> conv -> BN -> functional ReLU -> pool -> linear (hand-written CIFAR style)."""

    def __init__(self, relu, also_read: str = ""):
        super().__init__()
        self.relu, self.also_read = relu, also_read
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.side = nn.Conv2d(8, 8, 1)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 10)

    def forward(self, x):
        a = self.b1(self.c1(x))
        side = None
        if self.also_read == "op":  # another functional op reads the value before the ReLU
            side = a * 0.5
        elif self.also_read == "module":  # a layer reads it
            side = self.side(a)
        y = self.relu(a)
        y = self.relu(self.b2(self.c2(y)))
        if side is not None:
            y = y + side
        return self.fc(torch.flatten(self.pool(y), 1))


def _net(relu, also_read=""):
    torch.manual_seed(0)
    return bn_statistics_from_noise(FunctionalNet(relu, also_read), (8, 3, 8, 8))


def _sites(q):
    return {s["name"]: s for s in q.quant_config["sites"]}


@pytest.mark.parametrize("kind", list(RELUS))
def test_functional_relu_is_fused_into_the_layer_site(kind):
    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    q = zsq_fast.quantize(_net(RELUS[kind]), x, "W4A4", preset="hw")
    sites, layers = _sites(q), q.quant_config["layers"]
    assert sites["c1"]["signed"] is False and sites["c1"].get("relu_fused") is True
    assert sites["c2"]["signed"] is False and sites["c2"].get("relu_fused") is True
    assert layers["c2"]["input_from"] == "c1"  # one quantizer for the tensor
    # c2 reads a 16-level unsigned grid (a signed 4-bit site would leave it at most 8 non-negative levels)
    seen = {}
    (c2,) = [m for name, m in q.named_modules() if name.endswith("c2") and hasattr(m, "input_quantizer")]
    h = c2.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", mod.input_quantizer(args[0])))
    q(x)
    h.remove()
    levels = seen["x"].unique()
    assert levels.min() >= 0 and levels.numel() > 8


@pytest.mark.parametrize("also_read", ["op", "module"])
def test_relu_is_not_fused_when_something_else_reads_the_value(also_read):
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    q = zsq_fast.quantize(_net(RELUS["F.relu"], also_read), x, "W4A4", preset="hw")
    sites = _sites(q)
    assert sites["c1"]["signed"] is True and "relu_fused" not in sites["c1"]
    assert sites["c2"].get("relu_fused") is True  # the second ReLU is still c2's only reader


@pytest.mark.parametrize("kind", ["F.relu", "F.relu inplace"])
def test_fused_relu_exports_without_float_edges_and_reloads(kind, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from zsq_fast.quantize.onnx_qdq import float_edges
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    q = zsq_fast.quantize(_net(RELUS[kind]), x, "W4A4", preset="hw", method="brecq", iterations=4)
    path = tmp_path / "net.onnx"
    zsq_fast.export_onnx(q, path, torch.zeros(1, 3, 8, 8))
    assert float_edges(onnx.load(str(path))) == []
    r = zsq_fast.evaluate_onnx(path, x, reference=q, threads=1)
    assert r["agreement"] == 100.0 and r["max_logit_diff_steps"] == 0.0, r
    zsq_fast.save_quantized(q, tmp_path / "q.pt")
    again = zsq_fast.load_quantized(tmp_path / "q.pt", FunctionalNet(RELUS[kind]))
    assert torch.equal(again(x), q(x))


def test_torchvision_googlenet_w4a4_in_place_relus_fused_and_exact_in_onnxruntime(tmp_path):
    """GoogLeNet's BasicConv2d ends in F.relu(x, inplace=True) and its branches meet in torch.cat and MaxPool: one
    unsigned site per conv (was a signed conv site plus the block's), no float edge, and a graph onnxruntime loads
    at 4 bits (the fused ReLU is written as Identity, so no UINT4 MaxPool appears) and runs exactly."""
    tv = pytest.importorskip("torchvision.models")
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from zsq_fast.quantize.onnx_qdq import float_edges
    torch.manual_seed(0)
    m = bn_statistics_from_noise(tv.googlenet(num_classes=10, aux_logits=False, init_weights=True), (8, 3, 32, 32))
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    q = zsq_fast.quantize(m, x, "W4A4", preset="hw")
    fused = [s for s in q.quant_config["sites"] if s.get("relu_fused")]
    assert len(fused) == 57 and all(s["signed"] is False for s in fused)
    from torchvision.models.googlenet import BasicConv2d
    blocks = [s["name"] for s in q.quant_config["sites"] if isinstance(m.get_submodule(s["name"]), BasicConv2d)]
    assert blocks == []  # the conv's site is the block's output: not quantized a second time
    path = tmp_path / "googlenet.onnx"
    zsq_fast.export_onnx(q, path, torch.zeros(1, 3, 32, 32))
    assert float_edges(onnx.load(str(path))) == []
    r = zsq_fast.evaluate_onnx(path, x, reference=q, threads=1)
    assert r["agreement"] == 100.0 and r["max_logit_diff_steps"] == 0.0, r


class PreActNet(nn.Module):
    """A pre-activation residual: BN -> F.relu -> conv on the block input (the BN cannot be folded: a quantized
    depthwise 1x1 conv, fold.py), the block input also read by the residual add."""

    def __init__(self):
        super().__init__()
        self.c0, self.bn, self.c1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 10)

    def forward(self, x):
        x = self.c0(x)
        return self.fc(torch.flatten(self.pool(x + self.c1(F.relu(self.bn(x)))), 1))


def test_bn_as_conv_then_functional_relu_is_one_unsigned_site():
    torch.manual_seed(0)
    m = bn_statistics_from_noise(PreActNet(), (8, 3, 8, 8))
    q = zsq_fast.quantize(m, torch.randn(16, 3, 8, 8), "W4A4", preset="hw")
    assert q.quant_config["bn_as_conv"] == ["bn"]
    sites = _sites(q)
    assert sites["bn"]["signed"] is False and sites["bn"]["relu_fused"] is True
    assert sites["c0"]["signed"] is True and "relu_fused" not in sites["c0"]  # the add reads it too
    assert q.quant_config["layers"]["c1"]["input_from"] == "bn"

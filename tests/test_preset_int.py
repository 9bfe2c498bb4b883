"""The `int` preset (hw's grids, free scales, activation zero points) and onnxruntime; a signed 8-bit tensor read
through Reshape/Transpose (timm resnest's rsoftmax) exports a model onnxruntime loads."""
import pytest
import torch
from conftest import randomize_bn
from torch import nn

import zsq_fast
from zsq_fast.models.cifar_resnet import CifarResNet
from zsq_fast.quantize.modules import QUANT_LAYERS

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
timm_split_attn = pytest.importorskip("timm.layers.split_attn")

pytestmark = pytest.mark.usefixtures("one_thread")


class _RadixNet(nn.Module):
    """A conv's signed output (attention logits) through timm's RadixSoftmax (Reshape, Transpose, Softmax)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(8, 8, 1)
        self.rsoftmax = timm_split_attn.RadixSoftmax(2, 1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x):
        x = self.stem(x)
        a = self.rsoftmax(self.fc(self.pool(x))).view(x.shape[0], -1, 1, 1)
        return self.head(x * a)


@pytest.mark.parametrize("preset", ["hw", "int"])
def test_signed_tensor_through_reshape_to_softmax_loads(preset, tmp_path):
    # under hw the fc output is a signed int8 site read by a Reshape: the old export made onnxruntime 1.32 refuse
    # the model (its QDQ propagation and S8->U8 passes disagree on the zero point's type)
    torch.manual_seed(0)
    q = zsq_fast.quantize(_RadixNet().eval(), torch.randn(16, 3, 8, 8), "W8A8", preset=preset)
    path = tmp_path / "radix.onnx"
    zsq_fast.export_onnx(q, path, torch.zeros(1, 3, 8, 8))
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    r = zsq_fast.evaluate_onnx(path, torch.randn(256, 3, 8, 8), reference=q, threads=1)
    assert r["agreement"] >= 99.5 and r["max_logit_diff_steps"] <= (0.0 if preset == "hw" else 2.0), r


def test_int_preset_grids():
    torch.manual_seed(0)
    q = zsq_fast.quantize(randomize_bn(CifarResNet(8)), torch.randn(32, 3, 16, 16), "W4A4", preset="int")
    layers = [m for m in q.modules() if isinstance(m, QUANT_LAYERS)]
    scales = torch.cat([m.weight_quantizer.scale.detach() for m in layers])
    assert not torch.equal(torch.exp2(torch.round(torch.log2(scales))), scales)  # free, not powers of two
    assert all(m.weight_quantizer.spec.symmetric and m.int32_bias for m in layers)
    assert all(not m.input_quantizer.spec.symmetric for m in layers)  # activations carry a zero point
    assert q.output_quantizer is not None and q.quant_config["sites"]


@pytest.mark.parametrize("bits", ["W8A8", "W4A4"])
def test_int_preset_onnxruntime_matches_fake_quant(bits, tmp_path):
    """Residual adds (and the int32 bias) with free scales: onnxruntime's integer kernels requantize the int32
    accumulator with a float32 multiplier, the fake-quant model its float32 sum; they may differ by a step where a
    value is within rounding error of a boundary (ResNet-20 W8A8: 2 steps, 99.9 % agreement, RESULTS.md)."""
    torch.manual_seed(0)
    net = randomize_bn(CifarResNet(8))
    q = zsq_fast.quantize(net, torch.randn(64, 3, 16, 16), bits, preset="int")
    path = tmp_path / "q.onnx"
    zsq_fast.export_onnx(q, path, torch.zeros(1, 3, 16, 16))
    from zsq_fast.quantize.onnx_qdq import float_edges
    model = onnx.load(str(path))
    assert "Add" in {n.op_type for n in model.graph.node}
    assert float_edges(model) == []  # every tensor between ops is on a grid, as under hw
    r = zsq_fast.evaluate_onnx(path, torch.randn(512, 3, 16, 16), reference=q, threads=1)
    assert r["agreement"] >= 99.5 and r["max_logit_diff_steps"] <= 2.0, r

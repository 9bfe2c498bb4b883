"""BatchNorm that cannot be folded (BN -> ReLU -> Conv: pre-activation ResNets, DenseNet) is quantized as a depthwise
1x1 conv (per-channel weight, int32 bias under hw), exported as a QDQ Conv that onnxruntime runs exactly."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zsq_fast
from zsq_fast.errors import UnsupportedModelError
from zsq_fast.quantize.fold import bn_as_conv
from zsq_fast.quantize.trace import trace_model
from conftest import bn_statistics_from_noise

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class PreActBlock(nn.Module):
    """He et al. 2016's pre-activation block: BN -> ReLU -> conv, twice, plus the identity."""

    def __init__(self, c):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        return self.conv2(F.relu(self.bn2(out))) + x


def _with_bn_statistics(model, size):
    torch.manual_seed(0)
    return bn_statistics_from_noise(model, (8, 3, size, size))


def _preact_net():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), PreActBlock(8), PreActBlock(8), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    return _with_bn_statistics(net, 16)


def _float_edges(path) -> list[str]:
    """Data ops (Add/Concat/Conv/Gemm) with an input that does not come out of a DequantizeLinear."""
    g = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    producer = {o: n for n in g.node for o in n.output}
    return [f"{n.name}:{i}" for n in g.node if n.op_type in ("Add", "Concat", "Conv", "Gemm", "MatMul")
            for i in n.input if i not in producer or producer[i].op_type != "DequantizeLinear"]


def test_bn_as_conv_is_the_same_affine_map():
    bn = nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(-2, 2)
        bn.bias.uniform_(-1, 1)
    x = torch.randn(2, 5, 4, 4)
    conv = bn_as_conv(bn.eval())
    assert conv.groups == 5 and conv.kernel_size == (1, 1)
    torch.testing.assert_close(conv(x), bn(x), rtol=1e-5, atol=1e-6)


def test_a_layer_output_read_besides_its_bn_is_not_folded():
    """The stem conv's output feeds bn1 and the residual add: folding bn1 into it would change the add's input."""
    tr = trace_model(_preact_net(), torch.zeros(2, 3, 16, 16))
    assert ("0", "1.bn1") not in tr.bn_pairs
    assert {"1.bn1", "2.bn1", "3"} <= set(tr.orphan_bns)
    assert ("1.conv1", "1.bn2") in tr.bn_pairs  # conv1's output has no other reader: folded


@pytest.mark.parametrize("method", ["nearest", "brecq"])
def test_preact_resnet_quantizes_and_exports_exactly(method, tmp_path):
    net = _preact_net()
    x = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    q = zsq_fast.quantize(net, x, "W8A8", preset="hw", method=method, iterations=10)
    cfg = q.quant_config
    assert set(cfg["bn_as_conv"]) == {"1.bn1", "2.bn1", "3"}
    for name in cfg["bn_as_conv"]:
        assert cfg["layers"][name]["type"] == "conv2d" and cfg["layers"][name]["bias"] == "int32"
    with torch.no_grad():
        y, f = q(x), net(x)
    assert ((y - f).norm() / f.norm()).item() < 0.05
    path = tmp_path / "preact.onnx"
    zsq_fast.export_onnx(q, path, torch.zeros(1, 3, 16, 16))
    assert _float_edges(path) == []
    r = zsq_fast.evaluate_onnx(path, x, reference=q, threads=1)
    assert r["agreement"] == 100.0 and r["max_logit_diff_steps"] == 0.0, r
    zsq_fast.save_quantized(q, tmp_path / "q.pt")
    with torch.no_grad():
        assert torch.equal(zsq_fast.load_quantized(tmp_path / "q.pt", net)(x), y)


@pytest.mark.parametrize("bits", ["W8A8", "W4A4"])
def test_equal_integer_weights_export(bits, tmp_path):
    """Two BN-as-conv layers with the same statistics have equal integer weights, which the exporter stores once
    (the other read through an Identity node): each DequantizeLinear still gets its weight, in its own type."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), PreActBlock(4), PreActBlock(4), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 3)).eval()  # BN statistics at their defaults: all equal
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    q = zsq_fast.quantize(net, x, bits, preset="hw")
    path = tmp_path / "equal.onnx"
    zsq_fast.export_onnx(q, path, torch.zeros(1, 3, 8, 8))
    r = zsq_fast.evaluate_onnx(path, x, reference=q, threads=1)
    assert r["agreement"] == 100.0 and r["max_logit_diff_steps"] == 0.0, r


def test_densenet_quantizes_and_exports_exactly(tmp_path):
    """torchvision's DenseNet code (small growth and blocks to keep it fast; benchmarks/ runs densenet121)."""
    tv = pytest.importorskip("torchvision.models")
    net = _with_bn_statistics(tv.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2,
                                          num_classes=10), 32)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    q = zsq_fast.quantize(net, x, "W8A8", preset="hw")
    assert "features.denseblock1.denselayer1.norm1" in q.quant_config["bn_as_conv"]
    path = tmp_path / "densenet.onnx"
    zsq_fast.export_onnx(q, path, torch.zeros(1, 3, 32, 32))
    assert _float_edges(path) == []
    r = zsq_fast.evaluate_onnx(path, x, reference=q, threads=1)
    assert r["agreement"] == 100.0 and r["max_logit_diff_steps"] == 0.0, r


def test_unfoldable_batchnorm1d_is_refused_by_name():
    net = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 3))
    net = _with_bn_statistics(nn.Sequential(nn.Conv2d(3, 3, 1), net), 2).eval()
    with pytest.raises(UnsupportedModelError, match=r"1\.1: a BatchNorm1d"):
        zsq_fast.quantize(net, torch.randn(4, 3, 2, 2), "W8A8", preset="hw")

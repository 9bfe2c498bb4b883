"""Adaptive pools that enlarge a map (a torchvision VGG at 32 px pools 1x1 to 7x7): exported exactly, and one clear
error where no exact rewrite exists (the exporter used to fail with a SymbolicValueError)."""
import pytest
import torch
from torch import nn

import zsq_fast
from conftest import bn_statistics_from_noise
from zsq_fast.errors import UnsupportedModelError
from zsq_fast.quantize.onnx_pools import exportable_adaptive_pools

onnx = pytest.importorskip("onnx")

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class TinyVGG(nn.Module):
    """VGG's shape: conv/BN/ReLU stages with max pools, an adaptive pool to `pooled`, then a linear head."""

    def __init__(self, pooled=(7, 7), pool=nn.AdaptiveAvgPool2d):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2))
        self.avgpool = pool(pooled)
        self.classifier = nn.Linear(16 * pooled[0] * pooled[1], 10)

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _trained(model):
    torch.manual_seed(0)
    return bn_statistics_from_noise(model, (8, 3, 8, 8))


@pytest.mark.parametrize("size,pooled", [((1, 1), (7, 7)), ((2, 4), (4, 2)), ((2, 6), (6, 3)), ((3, 5), (3, 5))])
@pytest.mark.parametrize("pool", [nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d])
def test_rewrite_equals_the_pool(size, pooled, pool):
    m = pool(pooled)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    ref = m(x)
    with exportable_adaptive_pools(m, x):
        got = m(x)
    assert torch.equal(got, ref)
    assert "forward" not in vars(m)  # restored


@pytest.mark.parametrize("pool", [nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d])
def test_vgg_shape_at_a_small_input_exports_and_runs_as_fake_quant(pool, tmp_path):
    pytest.importorskip("onnxruntime")
    from zsq_fast.quantize.onnx_qdq import float_edges
    model = _trained(TinyVGG(pool=pool))
    x = torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(1))  # 4 px -> 1x1 before the pool
    q = zsq_fast.quantize(model, x, "W8A8", preset="hw")
    path = tmp_path / "tiny_vgg.onnx"
    zsq_fast.export_onnx(q, path, torch.zeros(1, 3, 4, 4))
    graph = onnx.load(str(path))
    assert any(n.op_type == "Gather" for n in graph.graph.node)
    assert float_edges(graph) == []
    r = zsq_fast.evaluate_onnx(path, x, reference=q, threads=1)
    assert r["agreement"] == 100.0 and r["max_logit_diff_steps"] == 0.0, r
    assert not any("forward" in vars(m) for m in q.modules())  # the export's rewrite is undone


def test_pool_without_an_exact_rewrite_names_the_module(tmp_path):
    model = _trained(TinyVGG(pooled=(2, 2)))
    x = torch.randn(4, 3, 12, 12)  # 3x3 before the pool: neither 3 | 2 nor 2 | 3
    q = zsq_fast.quantize(model, x, "W8A8", preset="hw")
    with pytest.raises(UnsupportedModelError, match=r"avgpool .*3x3 map to 2x2"):
        zsq_fast.export_onnx(q, tmp_path / "bad.onnx", torch.zeros(1, 3, 12, 12))
    assert not (tmp_path / "bad.onnx").exists()

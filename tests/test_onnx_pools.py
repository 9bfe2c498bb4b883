"""Adaptive pools to sizes that do not divide the input (a torchvision VGG at 32 px pools 1x1 to 7x7, timm's VGG
head 3x3 to 7x7): exported as ops onnxruntime runs (the exporter used to fail with a SymbolicValueError)."""
import pytest
import torch
from torch import nn

import zsq_fast
from conftest import bn_statistics_from_noise
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


@pytest.mark.parametrize("size,pooled", [((1, 1), (7, 7)), ((2, 4), (4, 2)), ((2, 6), (6, 3)), ((3, 5), (3, 5)),
                                         ((3, 3), (7, 7)), ((3, 3), (2, 2)), ((5, 7), (3, 4)), ((1, 3), (7, 2))])
@pytest.mark.parametrize("pool", [nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d])
def test_rewrite_equals_the_pool(size, pooled, pool):
    m = pool(pooled)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    ref = m(x)
    with exportable_adaptive_pools():
        got = m(x)
        fn = torch.nn.functional.adaptive_avg_pool2d(x, pooled)  # timm's heads call the functional op
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(fn, torch.nn.functional.adaptive_avg_pool2d(x, pooled), rtol=1e-12, atol=0)
    if pool is nn.AdaptiveMaxPool2d or all(o % i == 0 or i % o == 0 for i, o in zip(size, pooled)):
        assert torch.equal(got, ref)  # a max, a gather and a pool the exporter writes are exact
    assert torch.nn.functional.adaptive_avg_pool2d.__module__ == "torch.nn.functional"  # restored


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


@pytest.mark.parametrize("pool", [nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d])
def test_pool_to_a_size_that_does_not_divide_exports_and_runs(pool, tmp_path):
    pytest.importorskip("onnxruntime")
    model = _trained(TinyVGG(pooled=(2, 2), pool=pool))
    x = torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(1))  # 3x3 before the pool: 3 ∤ 2, 2 ∤ 3
    q = zsq_fast.quantize(model, x, "W8A8", preset="hw")
    path = tmp_path / "tiny_vgg.onnx"
    zsq_fast.export_onnx(q, path, torch.zeros(1, 3, 12, 12))
    r = zsq_fast.evaluate_onnx(path, x, reference=q, threads=1)
    assert r["agreement"] == 100.0 and r["max_logit_diff_steps"] <= 1.0, r

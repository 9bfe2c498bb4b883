"""The hw preset on torchvision CNNs (a few here; benchmarks/ has room for the whole sweep): BN statistics set by
train-mode passes on noise, W8A8 hw with nearest rounding, ONNX QDQ export that onnxruntime (default options)
runs with the fake-quant model's outputs, and no float tensor between quantized ops."""
import pytest
import torch

import zsq_fast
from zsq_fast.quantize.onnx_qdq import float_edges
from conftest import bn_statistics_from_noise

tv = pytest.importorskip("torchvision.models")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

SIZE = 64


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _with_bn_statistics(name: str):
    torch.manual_seed(0)
    return bn_statistics_from_noise(getattr(tv, name)(num_classes=10), (8, 3, SIZE, SIZE))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "shufflenet_v2_x0_5"])
def test_torchvision_hw_export_matches_and_has_no_float_edges(name, tmp_path):
    model = _with_bn_statistics(name)
    x = torch.randn(16, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    q = zsq_fast.quantize(model, x, "W8A8", preset="hw")
    assert len(q.quant_config["sites"]) > 10
    path = tmp_path / f"{name}.onnx"
    zsq_fast.export_onnx(q, path, torch.zeros(1, 3, SIZE, SIZE))
    graph = onnx.load(str(path))
    assert sum(n.op_type == "Conv" for n in graph.graph.node) > 10  # the check below has ops to look at
    assert float_edges(graph) == []
    r = zsq_fast.evaluate_onnx(path, x, reference=q, threads=1)
    assert r["agreement"] == 100.0 and r["max_logit_diff_steps"] <= 1.0, r



def test_shufflenet_w4a4_export_runs_exactly(tmp_path):
    """4-bit tensors read by MaxPool and by the channel split are stored as int8 + Clip (onnxruntime drops the Q/DQ
    around such ops and cannot run them on INT4/UINT4; the model used to fail to load)."""
    model = _with_bn_statistics("shufflenet_v2_x0_5")
    x = torch.randn(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    q = zsq_fast.quantize(model, x, "W4A4", preset="hw")
    path = tmp_path / "shufflenet_w4a4.onnx"
    zsq_fast.export_onnx(q, path, torch.zeros(1, 3, SIZE, SIZE))
    assert float_edges(onnx.load(str(path))) == []
    r = zsq_fast.evaluate_onnx(path, x, reference=q, threads=1)
    assert r["agreement"] == 100.0 and r["max_logit_diff_steps"] == 0.0, r

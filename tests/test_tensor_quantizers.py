"""One quantizer per tensor (hw as an integer accelerator holds it): layers reading the same tensor (a block
input feeding conv1 and the downsample) share one input quantizer through calibration, reconstruction,
save/load and ONNX export; quant_config lists every activation quantizer once."""
import pytest
import torch
from torch import nn

import zsq_fast
from zsq_fast.quantize import load_quantized, quantize, save_quantized
from zsq_fast.quantize.modules import QUANT_LAYERS

tv_resnet = pytest.importorskip("torchvision.models.resnet")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class DownsampleNet(nn.Module):
    """stem -> torchvision BasicBlock whose input feeds both conv1 and the 1x1 downsample -> pool -> fc."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        self.block = tv_resnet.BasicBlock(8, 16, stride=2, downsample=down)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.block(self.stem(x))), 1))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    m = DownsampleNet()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.3, 0.3)
            mod.running_var.uniform_(0.5, 2.0)
            mod.bias.data.uniform_(-0.3, 0.3)
    return m.eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(48, 3, 12, 12, generator=torch.Generator().manual_seed(1))


SHARED = ["block.conv1", "block.downsample.0"]


def _input_q(q, name):
    return q.model.get_submodule(name).input_quantizer


@pytest.mark.parametrize("method", ["nearest", "brecq"])
def test_a_tensor_read_by_two_convs_has_one_quantizer(net, images, method):
    q = quantize(net, images, "W4A4", preset="hw", method=method, iterations=20, batch_size=16)
    assert q.quant_config["shared_inputs"] == [SHARED]
    assert _input_q(q, SHARED[0]) is _input_q(q, SHARED[1])
    assert q.quant_config["layers"]["block.downsample.0"]["input_shared_with"] == "block.conv1"
    acts = q.quant_config["activations"]
    shared = [a for a in acts if a["readers"] == SHARED]
    assert len(shared) == 1 and shared[0]["scale"] == float(_input_q(q, SHARED[0]).effective_scale())
    layers = [n for n, m in q.model.named_modules() if isinstance(m, QUANT_LAYERS)]
    # every layer input listed once, plus the logits
    assert sorted(r for a in acts for r in a["readers"]) == sorted(layers)
    assert len(acts) == len(layers) - 1 + 1 and acts[-1]["tensor"] == "network output"
    for a in acts:
        assert a["bits"] == 4 and a["pow2"] and 2.0 ** round(__import__("math").log2(a["scale"])) == a["scale"]


def test_sharing_survives_save_and_load(net, images, tmp_path):
    q = quantize(net, images, "W4A4", preset="hw")
    save_quantized(q, tmp_path / "q.pt")
    r = load_quantized(tmp_path / "q.pt", DownsampleNet())
    assert _input_q(r, SHARED[0]) is _input_q(r, SHARED[1])
    with torch.no_grad():
        assert torch.equal(r(images), q(images))


def test_academic_first_layer_keeps_its_own_grid():
    """Readers on different grids (academic's 8-bit first layer) are not tied."""
    torch.manual_seed(0)

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc((self.a(x) + self.b(x)).mean((2, 3)))

    q = quantize(Two().eval(), torch.randn(8, 3, 4, 4), "W4A4", preset="academic")
    assert q.quant_config["shared_inputs"] == []
    assert q.model.a.input_quantizer is not q.model.b.input_quantizer
    q = quantize(Two().eval(), torch.randn(8, 3, 4, 4), "W4A4", preset="hw")
    assert q.quant_config["shared_inputs"] == [["a", "b"]]


def test_onnx_conv_and_gemm_inputs_come_out_of_dequantize(net, images, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    q = quantize(net, images, "W4A4", preset="hw")
    path = tmp_path / "q.onnx"
    zsq_fast.export_onnx(q, path, torch.zeros(1, 3, 12, 12))
    g = onnx.load(str(path)).graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    compute = [n for n in g.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert len(compute) == 5
    scales = []
    for n in compute:
        for i, name in enumerate(n.input):  # data, weight and bias all come from DequantizeLinear
            assert name in producer and producer[name].op_type == "DequantizeLinear", (n.name, i, name)
        dq = producer[n.input[0]]
        scales.append(float(onnx.numpy_helper.to_array(inits[dq.input[1]])))
    # the block's conv1 and downsample read the block input on one grid
    by_weight = {n.input[1]: s for n, s in zip(compute, scales)}
    conv1 = [s for w, s in by_weight.items() if "block.conv1" in w or "block/conv1" in w]
    down = [s for w, s in by_weight.items() if "downsample" in w]
    assert conv1 and down and conv1 == down
    r = zsq_fast.evaluate_onnx(path, images, reference=q, threads=1)
    assert r["agreement"] == 100.0 and r["max_logit_diff_steps"] <= 1.0, r

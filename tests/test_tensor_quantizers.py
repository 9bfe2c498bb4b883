"""One quantizer per tensor (hw as an integer accelerator holds it): layers reading the same tensor (a block
input feeding conv1 and the downsample) share one input quantizer through calibration, reconstruction,
save/load and ONNX export; quant_config lists every activation quantizer once."""
import math

import pytest
import torch
from conftest import randomize_bn
from torch import nn

import zsq_fast
from zsq_fast.quantize import load_quantized, quantize, save_quantized
from zsq_fast.quantize.modules import QUANT_LAYERS

tv_resnet = pytest.importorskip("torchvision.models.resnet")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


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
    return randomize_bn(DownsampleNet(), weight=False)


@pytest.fixture(scope="module")
def images():
    return torch.randn(48, 3, 12, 12, generator=torch.Generator().manual_seed(1))


SHARED = ["block.conv1", "block.downsample.0"]


def _input_q(q, name):
    return q.model.get_submodule(name).input_quantizer


@pytest.mark.parametrize("method", ["nearest", "brecq"])
def test_a_tensor_read_by_two_convs_has_one_quantizer(net, images, method):
    q = quantize(net, images, "W4A4", preset="hw", method=method, iterations=20, batch_size=16)
    assert _input_q(q, SHARED[0]) is _input_q(q, SHARED[1])
    # the block input is the stem's ReLU output: quantized once, by its producer, read by both convs
    layers = q.quant_config["layers"]
    assert layers["block.conv1"]["input_from"] == layers["block.downsample.0"]["input_from"] == "stem.2"
    acts = q.quant_config["activations"]
    shared = [a for a in acts if a["readers"] == SHARED]
    assert len(shared) == 1 and shared[0]["scale"] == float(_input_q(q, SHARED[0]).effective_scale())
    layers = [n for n, m in q.model.named_modules() if isinstance(m, QUANT_LAYERS)]
    # every layer input listed once (as a site's output or the layer's own input quantizer), plus the logits
    assert sorted(r for a in acts for r in a["readers"]) == sorted(layers)
    assert len({a["tensor"] for a in acts}) == len(acts) and acts[-1]["tensor"] == "network output"
    assert [a["tensor"] for a in acts if a["tensor"].startswith("output of")] == \
        [f"output of {s['name']}" for s in q.quant_config["sites"]]
    for a in acts:
        assert a["pow2"] and 2.0 ** round(math.log2(a["scale"])) == a["scale"]
        assert a["bits"] == (8 if a["tensor"] == "input of stem.0" else 4)  # the image on an 8-bit grid


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
    assert q.quant_config["shared_inputs"] == [["a", "b"]]  # both read the network input
    assert q.model.a.input_quantizer is q.model.b.input_quantizer


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
    # the image on an 8-bit grid, every other tensor at 4 bits
    qtypes = [inits[n.input[2]].data_type for n in g.node if n.op_type == "QuantizeLinear"]
    T = onnx.TensorProto
    assert qtypes.count(T.INT8) == 1 and set(qtypes) - {T.INT8} <= {T.INT4, T.UINT4}
    r = zsq_fast.evaluate_onnx(path, images, reference=q, threads=1)
    assert r["agreement"] == 100.0 and r["max_logit_diff_steps"] <= 1.0, r


def _cifar_resnet8():
    from zsq_fast.models.cifar_resnet import CifarResNet

    torch.manual_seed(0)
    return randomize_bn(CifarResNet(8), weight=False)


def _flatten_net():
    torch.manual_seed(4)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


@pytest.mark.parametrize("arch", ["cifar_resnet8", "downsample_net", "flatten_net"])
def test_no_float_tensor_crosses_between_quantized_ops(arch, net, tmp_path):
    """hw as an integer accelerator runs it: in the ONNX QDQ graph every input of every Add/Concat/Conv/Gemm
    (residual-add operands included: identity and option-A shortcuts) comes out of a DequantizeLinear, and
    onnxruntime (default options) gives the fake-quant model's outputs."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model, size = {"cifar_resnet8": (_cifar_resnet8(), 16), "downsample_net": (net, 12),
                   "flatten_net": (_flatten_net(), 12)}[arch]
    x = torch.randn(64, 3, size, size, generator=torch.Generator().manual_seed(3))
    q = quantize(model, x, "W4A4", preset="hw")
    path = tmp_path / "q.onnx"
    zsq_fast.export_onnx(q, path, torch.zeros(1, 3, size, size))
    g = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    producer = {o: n for n in g.node for o in n.output}
    elem = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.output]}
    # data ops only: a Concat of int64 pads (F.pad's shape arithmetic) carries no activation
    checked = [n for n in g.node if n.op_type in ("Add", "Sum", "Concat", "Conv", "Gemm", "MatMul")
               and elem.get(n.output[0]) == onnx.TensorProto.FLOAT]
    assert sum(n.op_type == "Add" for n in checked) == {"cifar_resnet8": 3, "downsample_net": 1, "flatten_net": 0}[arch]
    for n in checked:
        for name in n.input:
            assert name in producer and producer[name].op_type == "DequantizeLinear", (n.name, name)
    # the network output too
    assert producer[g.output[0].name].op_type == "DequantizeLinear"
    r = zsq_fast.evaluate_onnx(path, x, reference=q, threads=1)
    assert r["agreement"] >= 99.9 and r["max_logit_diff_steps"] <= 1.0, r


def test_block_outputs_and_add_operands_are_sites():
    q = quantize(_cifar_resnet8(), torch.randn(32, 3, 16, 16), "W4A4", preset="hw")
    sites = [s["name"] for s in q.quant_config["sites"]]
    # the add operands (conv2 after its folded BN, the option-A shortcut), the block outputs (made by relu2),
    # the stem ReLU, the pooled features; the block itself adds no second quantizer on its output
    assert {"relu", "layer1.0.conv2", "layer1.0.relu2", "layer2.0.shortcut", "layer2.0.conv2", "layer2.0.relu2",
            "pool"} <= set(sites)
    assert "layer1.0" not in sites
    assert "layer1.0.conv1" not in sites  # fused with its ReLU: relu1's output is the site
    assert q.quant_config["layers"]["layer1.0.conv1"]["input_from"] == "relu"
    assert q.quant_config["layers"]["linear"]["input_from"] == "pool"
    academic = quantize(_cifar_resnet8(), torch.randn(32, 3, 16, 16), "W4A4", preset="academic")
    assert academic.quant_config["sites"] == []  # academic: layer inputs only, as before


def test_dgh_paper_preset_is_brecqs_setting(tmp_path):
    """dgh_paper: every layer at the target bits, asymmetric free weight scales, block outputs quantized (read
    by the next block's layers), the image float, the output quantized, float bias."""
    model = _cifar_resnet8()
    x = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    q = quantize(model, x, "W4A4", preset="dgh_paper", method="brecq", iterations=10, batch_size=16)
    cfg = q.quant_config
    # the block outputs (made by each block's last ReLU module)
    assert [s["name"] for s in cfg["sites"]] == ["layer1.0.relu2", "layer2.0.relu2", "layer3.0.relu2"]
    assert all(not s["symmetric"] and not s["pow2"] and s["bits"] == 4 for s in cfg["sites"])
    assert cfg["layers"]["layer2.0.conv1"]["input_from"] == "layer1.0.relu2"
    assert not q.model.conv1.input_quantizer.enabled and cfg["layers"]["conv1"]["input_quantized"] is False
    for name, lc in cfg["layers"].items():  # first and last layer included
        assert lc["weight"]["bits"] == 4 and not lc["weight"]["symmetric"] and not lc["weight"]["pow2"], name
        assert lc["bias"] in (None, "float")
    assert cfg["output"]["quantized"] and not cfg["output"]["symmetric"]
    assert all(a["tensor"] != "input of conv1" for a in cfg["activations"])
    # the image is not quantized: a change below any 8-bit step of the input still changes the output
    with torch.no_grad():
        y = q.model(x[:4])
        assert not torch.equal(q.model(x[:4] + 1e-3), y)
    save_quantized(q, tmp_path / "q.pt")
    r = load_quantized(tmp_path / "q.pt", _cifar_resnet8())
    assert not r.model.conv1.input_quantizer.enabled
    with torch.no_grad():
        assert torch.equal(r(x), q(x))

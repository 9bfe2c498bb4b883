"""hw sites of a module called more than once (torchvision's BasicBlock applies one ReLU module after bn1 and
after the residual add): each call quantizes its own tensor on its own grid, through calibration, BRECQ,
save/load, deepcopy and ONNX export; where the calls cannot be told apart the module keeps one quantizer and
quant_config says so."""
import copy
import dataclasses

import pytest
import torch
from torch import nn

import zsq_fast
from zsq_fast.quantize import load_quantized, quantize, save_quantized
from zsq_fast.quantize.presets import PRESETS
from zsq_fast.quantize.sites import SiteHook, parse_site, site_name
from conftest import bn_statistics_from_noise

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class Block(nn.Module):
    """BasicBlock-like: relu(bn1(conv1 x)) -> bn2(conv2) + x -> relu; one ReLU module for both (torchvision's
    way) or two (separate=True: the reference)."""

    def __init__(self, separate: bool = False):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        if separate:
            self.relu2 = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + x
        return (self.relu2 if hasattr(self, "relu2") else self.relu)(out)


class Net(nn.Module):
    def __init__(self, separate: bool = False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = Block(separate)
        self.head = nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


def _net(separate: bool = False) -> Net:
    torch.manual_seed(0)
    m = Net(separate).train()
    with torch.no_grad():  # BN statistics of the data, then the block output ~ 30x conv1's activation
        for _ in range(2):
            m(torch.randn(32, 3, 8, 8))
        m.block.bn1.weight.fill_(0.1)
        m.block.bn1.bias.zero_()
        m.block.bn2.weight.fill_(3.0)
    return m.eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(48, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _site_q(q, name):
    return q.site_quantizers[[s["name"] for s in q.quant_config["sites"]].index(name)]


def test_site_names_parse():
    assert site_name("layer1.0.relu", 0) == "layer1.0.relu" and site_name("layer1.0.relu", 2) == "layer1.0.relu@2"
    for name in ["relu", "layer1.0.relu@1", "a.b@12"]:
        assert site_name(*parse_site(name)) == name
    assert parse_site("odd@name") == ("odd@name", 0) and parse_site("x@0") == ("x@0", 0)


def test_each_call_has_its_own_site_and_equals_two_modules(images):
    q = quantize(_net(), images, "W4A4", preset="hw")
    ref = quantize(_net(separate=True), images, "W4A4", preset="hw")
    cfg = q.quant_config
    sites = {s["name"]: s for s in cfg["sites"]}
    assert {"block.relu", "block.relu@1"} <= set(sites) and "block.relu2" in {s["name"] for s in ref.quant_config["sites"]}
    assert sites["block.relu"]["caller"] == sites["block.relu@1"]["caller"] == "block"
    assert sites["block.relu"]["calls"] == sites["block.relu@1"]["calls"] == 2
    inner, out = _site_q(q, "block.relu"), _site_q(q, "block.relu@1")
    assert inner is not out
    # the block output's grid is far coarser than conv1's activation's
    assert float(out.effective_scale()) >= 8 * float(inner.effective_scale())
    assert float(inner.effective_scale()) == float(_site_q(ref, "block.relu").effective_scale())
    assert float(out.effective_scale()) == float(_site_q(ref, "block.relu2").effective_scale())
    # conv2 reads the first call's output, the next layer the second's
    assert cfg["layers"]["block.conv2"]["input_from"] == "block.relu"
    assert cfg["layers"]["head.0"]["input_from"] == "block.relu@1"
    assert {a["tensor"] for a in cfg["activations"]} >= {"output of block.relu", "output of block.relu@1"}
    with torch.no_grad():
        assert torch.equal(q(images), ref(images))
        copied = copy.deepcopy(q)  # the hooks follow the copied quantizers
        assert torch.equal(copied(images), q(images))
        _site_q(copied, "block.relu").scale.mul_(4)
        assert not torch.equal(copied(images), q(images)) and torch.equal(q(images), ref(images))


def test_per_call_sites_survive_save_and_load(images, tmp_path):
    q = quantize(_net(), images, "W4A4", preset="hw")
    save_quantized(q, tmp_path / "q.pt")
    r = load_quantized(tmp_path / "q.pt", Net())
    hooks = [h for h in r.model.block.relu._forward_hooks.values() if isinstance(h, SiteHook)]
    assert len(hooks) == 1 and hooks[0].per_call == [_site_q(r, "block.relu"), _site_q(r, "block.relu@1")]
    with torch.no_grad():
        assert torch.equal(r(images), q(images))
        assert torch.equal(r(images[:5]), q(images[:5]))  # and again: the count starts over at each forward


def test_dgh_paper_quantizes_only_the_block_output_call(images):
    q = quantize(_net(), images, "W4A4", preset="dgh_paper")
    assert [s["name"] for s in q.quant_config["sites"]] == ["block.relu@1"]
    ref = quantize(_net(separate=True), images, "W4A4", preset="dgh_paper")
    with torch.no_grad():
        assert torch.equal(q(images), ref(images))


@pytest.mark.parametrize("cache,qdrop", [("host", False), ("recompute", True)])
def test_brecq_learns_each_calls_scale(images, cache, qdrop, monkeypatch):
    # free activation scales (hw's powers of two move only when the exponent changes): each learned scale is
    # seen moving off its calibrated value, by its own amount
    monkeypatch.setitem(PRESETS, "hw", dataclasses.replace(PRESETS["hw"], pow2=False))
    start = quantize(_net(), images, "W4A4", preset="hw")
    q = quantize(_net(), images, "W4A4", preset="hw", method="brecq", iterations=40, batch_size=16, cache=cache,
                 act_lr=0.05, qdrop=qdrop)
    assert [u["name"] for u in q.quant_config["units"]][:2] == ["stem.0", "block"]
    moved = [float(_site_q(q, n).scale) / float(_site_q(start, n).scale) for n in ("block.relu", "block.relu@1")]
    assert all(abs(m - 1) > 1e-3 for m in moved) and abs(moved[0] - moved[1]) > 1e-3, moved
    ref = quantize(_net(separate=True), images, "W4A4", preset="hw", method="brecq", iterations=40, batch_size=16,
                   cache=cache, act_lr=0.05, qdrop=qdrop)
    assert float(_site_q(q, "block.relu@1").scale) == float(_site_q(ref, "block.relu2").scale)
    with torch.no_grad():
        assert torch.equal(q(images), ref(images))


class Shared(nn.Module):
    """One ReLU module called by two different modules: its calls cannot be counted from one caller."""

    def __init__(self):
        super().__init__()
        act = nn.ReLU()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), act)
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), act)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.b(self.a(x)).mean((2, 3)))


class Reused(nn.Module):
    """A ReLU whose caller (the Sequential `unit`) runs twice per forward: a count per caller call would restart."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.unit = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.unit(self.unit(self.stem(x))).mean((2, 3)))


@pytest.mark.parametrize("arch,act,reader", [(Shared, "a.1", "b.0"), (Reused, "unit.1", None)])
def test_calls_that_cannot_be_counted_share_one_quantizer_and_say_so(images, tmp_path, arch, act, reader):
    torch.manual_seed(0)
    q = quantize(arch().eval(), images, "W4A4", preset="hw")
    acts = [s for s in q.quant_config["sites"] if parse_site(s["name"])[0] == act]
    assert [s["name"] for s in acts] == [act] and acts[0]["shared_calls"] == 2 and "calls" not in acts[0]
    hooks = [h for h in q.model.get_submodule(act)._forward_hooks.values() if isinstance(h, SiteHook)]
    assert len(hooks) == 1 and hooks[0].per_call == [_site_q(q, act)]
    if reader is not None:
        assert q.quant_config["layers"][reader]["input_from"] == act
    save_quantized(q, tmp_path / "q.pt")
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "q.pt", arch())(images), q(images))


def test_torchvision_resnet18_onnx_has_a_grid_per_relu_call(tmp_path):
    tv = pytest.importorskip("torchvision.models")
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from zsq_fast.quantize.onnx_qdq import float_edges

    torch.manual_seed(0)
    model = bn_statistics_from_noise(tv.resnet18(num_classes=10), (8, 3, 32, 32), passes=2)
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    q = zsq_fast.quantize(model, x, "W8A8", preset="hw")
    relu_sites = [s["name"] for s in q.quant_config["sites"] if parse_site(s["name"])[0].endswith("relu")]
    assert len(relu_sites) == 1 + 2 * 8  # the stem's, and two calls in each of the 8 blocks
    scales = {n: float(_site_q(q, n).effective_scale()) for n in relu_sites}
    assert any(scales[f"layer{i}.{j}.relu"] != scales[f"layer{i}.{j}.relu@1"] for i in range(1, 5) for j in (0, 1))
    path = tmp_path / "resnet18.onnx"
    zsq_fast.export_onnx(q, path, torch.zeros(1, 3, 32, 32))
    graph = onnx.load(str(path)).graph
    consumers = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    # each Relu (graph order = call order) feeds one QuantizeLinear with its call's scale
    got = []
    for n in graph.node:
        if n.op_type == "Relu":
            (ql,) = consumers[n.output[0]]
            assert ql.op_type == "QuantizeLinear"
            got.append(float(inits[ql.input[1]]))
    assert got == [scales[n] for n in relu_sites]
    assert float_edges(onnx.load(str(path))) == []
    r = zsq_fast.evaluate_onnx(path, x, reference=q, threads=1)
    assert r["agreement"] == 100.0 and r["max_logit_diff_steps"] <= 1.0, r

"""zsq_fast.quantize: BN folding, presets, calibration, AdaRound/BRECQ, caching, save/load, ONNX."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_bn
from torch import nn

import zsq_fast
from zsq_fast.models.cifar_resnet import BasicBlock as CifarBlock
from zsq_fast.models.cifar_resnet import CifarResNet
from zsq_fast.quantize import QuantizedModel, load_quantized, quantize, save_quantized
from zsq_fast.quantize.adaround import ReconConfig, beta_schedule
from zsq_fast.quantize.blocks import find_units
from zsq_fast.quantize.calibrate import mse_search, scale_from_range
from zsq_fast.quantize.fold import fold_bn
from zsq_fast.quantize.modules import QUANT_LAYERS
from zsq_fast.quantize.presets import parse_bits
from zsq_fast.quantize.quantizer import Quantizer, QuantSpec
from zsq_fast.quantize.trace import trace_model


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class Residual(nn.Module):
    """A residual module of no known type: the generic block rule must pick it up."""

    def __init__(self, c):
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.b = nn.Conv2d(c, c, 1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(x + self.b(self.act(self.bn(self.a(x)))))


class TinyResNet(nn.Module):
    def __init__(self, c=8, classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.block1 = CifarBlock(c, c)
        self.block2 = CifarBlock(c, 2 * c, stride=2)
        self.block3 = Residual(2 * c)
        self.fc = nn.Linear(2 * c, classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.block3(self.block2(self.block1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@pytest.fixture
def net():
    torch.manual_seed(0)
    return randomize_bn(TinyResNet())


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(48, 3, 8, 8)


def _quantizers(q):
    return [(n, m) for n, m in q.named_modules() if isinstance(m, Quantizer)]


# ---------------------------------------------------------------- folding and presets
def test_bn_folding_is_exact(net, images):
    ref = net(images)
    model = TinyResNet()
    model.load_state_dict(net.state_dict())
    model.eval()
    tr = trace_model(model, images[:2])
    assert ("conv1", "bn1") in tr.bn_pairs and ("block3.a", "block3.bn") in tr.bn_pairs
    assert len(tr.bn_pairs) == 6 and not tr.orphan_bns
    fold_bn(model, tr.bn_pairs)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(model(images), ref, atol=1e-5, rtol=1e-5)


def test_16_bits_matches_float(net, images):
    ref = net(images)
    # academic keeps its first and last layer at 8 bits, hence the looser bound; hw's image grid is 8-bit
    # unless input_bits says otherwise
    for preset, tol, kw in (("hw", 2e-4, {"input_bits": 16}), ("academic", 2e-2, {}), ("dgh_paper", 2e-4, {})):
        q = quantize(net, images, "W16A16", preset=preset, calibration="minmax", **kw)
        with torch.no_grad():
            out = q(images)
        assert (out - ref).abs().max() < tol * ref.abs().max(), preset


def test_hw_scales_are_powers_of_two_and_edges_quantized(net, images):
    q = quantize(net, images, "W4A4", preset="hw")
    assert isinstance(q, QuantizedModel) and q.output_quantizer is not None
    for name, qz in _quantizers(q):
        e = torch.log2(qz.scale.detach())
        assert torch.equal(e, e.round()), name
        # the image on an 8-bit grid (hw's default input_bits), every other tensor at the target bits
        assert qz.spec.bits == (8 if name == "model.conv1.input_quantizer" else 4), name
        assert qz.spec.symmetric and qz.spec.pow2, name
    cfg = q.quant_config
    assert cfg["layers"]["conv1"]["role"] == "first" and cfg["layers"]["fc"]["role"] == "last"
    assert cfg["layers"]["conv1"]["weight"]["bits"] == 4 and cfg["layers"]["fc"]["weight"]["bits"] == 4
    assert cfg["output"] == {"quantized": True, "bits": 4, "signed": True, "symmetric": True, "axis": None,
                             "pow2": True}
    # unsigned activations after ReLU, signed image input
    assert cfg["layers"]["block1.conv1"]["input"]["signed"] is False
    assert cfg["layers"]["conv1"]["input"]["signed"] is True
    # weights are integers in the 4-bit signed range
    w = q.model.block1.conv1.w_int
    assert w.dtype == torch.int8 and int(w.min()) >= -8 and int(w.max()) <= 7


def test_academic_keeps_first_and_last_at_8_bits(net, images):
    q = quantize(net, images, "W4A4", preset="academic", calibration="percentile")
    cfg = q.quant_config
    assert q.output_quantizer is None and cfg["output"] == {"quantized": False}
    assert q.model.conv1.weight_quantizer.spec.bits == 8 and q.model.fc.weight_quantizer.spec.bits == 8
    assert q.model.conv1.input_quantizer.spec.bits == 8 and q.model.fc.input_quantizer.spec.bits == 8
    inner = q.model.block1.conv1
    assert inner.weight_quantizer.spec == QuantSpec(4, signed=False, symmetric=False, axis=0, pow2=False)
    assert inner.input_quantizer.spec == QuantSpec(4, signed=False, symmetric=False, axis=None, pow2=False)
    for name, lc in cfg["layers"].items():
        assert lc["weight"]["bits"] == (8 if lc["role"] != "inner" else 4), name
    assert not torch.equal(inner.zero_point if hasattr(inner, "zero_point") else inner.weight_quantizer.zero_point,
                           torch.zeros_like(inner.weight_quantizer.zero_point))


@pytest.mark.parametrize("bits,expected", [("W4A4", (4, 4)), ("w3a8", (3, 8)), ("W2A4", (2, 4)),
                                           ("W8A8", (8, 8))])
def test_parse_bits(bits, expected):
    assert parse_bits(bits) == expected


@pytest.mark.parametrize("bits", ["W0A4", "W4", "A4W4", "W4A4x", "W17A8", "W1A8", ""])
def test_bad_bits_raise(net, images, bits):
    with pytest.raises(ValueError, match=r"W\{w\}A\{a\}"):
        quantize(net, images, bits)


def test_clear_errors(net, images):
    with pytest.raises(TypeError, match="bits"):
        quantize(net, images, 44)
    with pytest.raises(ValueError, match="empty"):
        quantize(net, images[:0])
    with pytest.raises(ValueError, match="empty"):
        quantize(net, [])
    with pytest.raises(TypeError, match="float"):
        quantize(net, (images * 100).to(torch.uint8))
    with pytest.raises(ValueError, match="preset"):
        quantize(net, images, preset="fast")
    with pytest.raises(ValueError, match="method"):
        quantize(net, images, method="gptq")
    with pytest.raises(ValueError, match="cache"):
        quantize(net, images, method="brecq", cache="ssd")

    class WithNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.norm = nn.GroupNorm(2, 4)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.norm(self.conv(x)).mean((2, 3)))

    with pytest.raises(ValueError, match=r"norm \(GroupNorm\).*skip"):
        quantize(WithNorm().eval(), images)
    q = quantize(WithNorm().eval(), images, skip=["norm"])  # deliberately float, and recorded
    assert q.quant_config["float_modules"] == ["norm"]

    class Conv1dNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv1d(3, 4, 3)

        def forward(self, x):
            return self.c(x.flatten(2))

    with pytest.raises(ValueError, match=r"c \(Conv1d\)"):
        quantize(Conv1dNet().eval(), images)


# ---------------------------------------------------------------- calibration
def test_mse_search_matches_per_channel_loop():
    torch.manual_seed(0)
    w = torch.randn(6, 40) * torch.linspace(0.1, 2, 6).view(-1, 1)
    w[0, 0] = 9.0  # an outlier: MSE must clip it
    spec = QuantSpec(3, signed=True, symmetric=True, axis=0)
    s, z = mse_search(w, spec, candidates=50, p=2.0)
    qmin, qmax = spec.qrange
    for c in range(6):
        best, best_err = None, math.inf
        for r in torch.linspace(1.0, 0.01, 50):
            sc, _ = scale_from_range(r * w[c].min().view(1), r * w[c].max().view(1), spec)
            err = ((torch.clamp(torch.round(w[c] / sc), qmin, qmax) * sc - w[c]) ** 2).sum()
            if err < best_err:
                best, best_err = sc, err
        torch.testing.assert_close(s[c:c + 1], best)
    assert torch.all(z == 0)


@pytest.mark.parametrize("signed", [True, False])
def test_mse_search_pow2_distinct_candidates_equal_full_search(signed):
    """hw grids search only the distinct powers of two; the choice must equal the 100-ratio search."""
    from zsq_fast.quantize.calibrate import _lp_error

    torch.manual_seed(1)
    x = torch.randn(16, 300) * torch.logspace(-3, 1, 16).view(-1, 1)
    x = x if signed else x.abs()
    x[3, 7] = 50.0
    spec = QuantSpec(4, signed=signed, symmetric=True, axis=0, pow2=True)
    s, z = mse_search(x, spec, candidates=100, p=2.4)
    ratios = torch.linspace(1.0, 0.01, 100).view(-1, 1)
    full_s, full_z = scale_from_range(ratios * x.min(1).values, ratios * x.max(1).values, spec)
    err = _lp_error(x, full_s, full_z, spec, 2.4)
    best = full_s[err.argmin(0), torch.arange(16)]
    torch.testing.assert_close(s, best, rtol=0, atol=0)
    assert torch.all(z == 0) and torch.all(torch.log2(s) == torch.log2(s).round())


def test_asymmetric_range_covers_data():
    spec = QuantSpec(4, signed=False, symmetric=False)
    s, z = scale_from_range(torch.tensor([-1.0]), torch.tensor([3.0]), spec)
    assert torch.allclose(s, torch.tensor([4.0 / 15])) and z.item() == 4.0


# ---------------------------------------------------------------- reconstruction
def test_observer_sample_is_not_changed_by_later_in_place_ops():
    from zsq_fast.quantize.calibrate import ActObserver
    obs = ActObserver(64, 4, torch.Generator().manual_seed(0))  # 16 per image: every element of a (4, 2, 2) image
    act = torch.randn(4, 4, 2, 2)
    obs.observe(act)
    kept = obs.samples[0].clone()
    act.relu_()  # the model changes its activation in place after the observer's hook
    assert torch.equal(obs.samples[0], kept) and kept.min() < 0


def test_qdrop_mask_and_mix():
    from zsq_fast.quantize.quantizer import qdrop_mask, qdrop_mix
    x = torch.randn(6, 3, 4, 4)
    torch.manual_seed(3)
    whole = qdrop_mask(x, 0.5, (6, torch.arange(6)))  # one process holding the whole batch
    torch.manual_seed(3)
    part = qdrop_mask(x[[1, 4]], 0.5, (6, torch.tensor([1, 4])))  # a rank holding rows 1 and 4 of it
    assert torch.equal(part, whole[[1, 4]]) and 0.3 < whole.float().mean() < 0.7
    a, b = torch.randn(6, 3, 4, 4, requires_grad=True), torch.randn(6, 3, 4, 4, requires_grad=True)
    mixed = qdrop_mix(whole, a, b)
    torch.testing.assert_close(mixed, torch.where(whole, a, b), rtol=0, atol=1e-6)
    mixed.sum().backward()
    assert torch.equal(a.grad, whole.float()) and torch.equal(b.grad, 1 - whole.float())


def test_qdrop_drops_a_tensor_once_per_step_however_many_readers_apply_the_quantizer():
    """Within a reconstruction step (drop_memo set), a second reader of the same tensor (one quantizer shared by
    two layers) gets the first reader's output, and a reader of a view of that output (torch.flatten) gets its
    input back: one mask per tensor, as QDrop draws one per activation. Without the memo each call draws its own;
    after an in-place change the view is a new value and is quantized again."""
    from zsq_fast.quantize.quantizer import QuantSpec, Quantizer
    q = Quantizer(QuantSpec(4, signed=True))
    q.set_params(torch.tensor([0.25]))
    q.drop_prob = 0.5
    x = torch.randn(8, 6, 1, 1).relu_()  # made in place: its version is not 0
    a, b = q(x), q(x)
    assert not torch.equal(a, b)  # no memo: two masks
    q.drop_memo = []
    y = q(x)
    assert q(x) is y and len(q.drop_memo) == 1
    w = q(torch.randn(8, 6, 1, 1))
    w.add_(1.0)  # a first reader that changed the output in place: the second reader is not given it
    assert q(w) is not w and len(q.drop_memo) == 3
    flat = y.flatten(1)
    assert q(flat) is flat and len(q.drop_memo) == 3
    z = y.clone().flatten(1)  # the same values in another tensor: quantized (and dropped) again
    q(z)
    assert len(q.drop_memo) == 4
    x.mul_(3.0)  # changed in place: not the tensor quantized before
    assert q(x) is not y and len(q.drop_memo) == 5
    y.mul_(3.0)  # nor is a view of the changed output this step's output any more
    q(y.flatten(1))
    assert len(q.drop_memo) == 6


def test_qdrop_memo_only_while_reconstructing(images):
    """academic: the downsample conv and conv1 of a block read one tensor through one input quantizer; QDrop's
    per-step memo is set by the loop and cleared after it."""
    tv = pytest.importorskip("torchvision.models.resnet")
    torch.manual_seed(0)
    ds = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), tv.BasicBlock(8, 16, stride=2, downsample=ds),
                                        nn.Flatten(), nn.Linear(16 * 16, 3)))
    seen, hits = [], []
    from zsq_fast.quantize import quantizer as qmod
    real_forward = qmod.Quantizer.forward

    def spy(self, x):
        if self.drop_prob <= 0:
            return real_forward(self, x)
        seen.append(self.drop_memo is not None)
        n = len(self.drop_memo or [])
        out = real_forward(self, x)
        if self.drop_memo is not None and len(self.drop_memo) == n:
            hits.append(id(self))
        return out

    qmod.Quantizer.forward = spy
    try:
        q = quantize(model, images, "W4A4", preset="academic", method="brecq", iterations=3, batch_size=8, qdrop=0.5)
    finally:
        qmod.Quantizer.forward = real_forward
    assert seen and all(seen)
    shared = [m.input_quantizer for n, m in q.model.named_modules() if n in ("1.conv1", "1.downsample.0")]
    assert len(shared) == 2 and shared[0] is shared[1]
    assert hits == [id(shared[0])] * 3  # the block's 3 steps: its second reader reused the first's mask
    assert all(m.drop_memo is None and m.drop_prob == 0 for m in q.modules() if isinstance(m, qmod.Quantizer))


def test_beta_schedule():
    cfg = ReconConfig(iterations=100)
    assert beta_schedule(0, 100, cfg) is None and beta_schedule(19, 100, cfg) is None
    assert beta_schedule(20, 100, cfg) == pytest.approx(20.0)
    assert beta_schedule(99, 100, cfg) == pytest.approx(2.0, abs=0.3)
    assert beta_schedule(60, 100, cfg) == pytest.approx(11.0)


def test_adaround_beats_nearest_on_a_fixed_layer():
    # academic: the 3-bit middle layer dominates the error (first/last stay at 8 bits)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 4, 1)).eval()
    x = torch.randn(64, 4, 6, 6)
    ref = model(x).detach()
    err = {}
    for method in ("nearest", "adaround"):
        q = quantize(model, x, "W3A16", preset="academic", method=method, iterations=100, lr=1e-2, batch_size=16)
        err[method] = (q(x).detach() - ref).pow(2).mean().item()
        w = q.model[1].w_int  # still on the 3-bit (unsigned, asymmetric) grid
        assert w.dtype == torch.uint8 and int(w.max()) <= 7
    assert err["adaround"] < 0.85 * err["nearest"], err


def test_find_units(net, images):
    q = quantize(net, images, "W8A8")
    order = trace_model(q.model, images[:1]).order
    units = find_units(q.model, order)
    assert [(u.name, u.kind) for u in units] == [("conv1", "layer"), ("block1", "block"), ("block2", "block"),
                                                  ("block3", "block"), ("fc", "layer")]
    assert units[3].layers == ["block3.a", "block3.b"]
    assert all(u.kind == "layer" for u in find_units(q.model, order, blocks=False))


def test_brecq_on_tiny_residual_net(net, images):
    ref = net(images).detach()
    calls = []
    near = quantize(net, images, "W3A8", preset="hw")
    q = quantize(net, images, "W3A8", preset="hw", method="brecq", iterations=25, lr=1e-2, batch_size=16,
                 qdrop=True, progress=lambda s, t, info: calls.append((s, t, info)))
    units = q.quant_config["units"]
    assert [u["kind"] for u in units] == ["layer", "block", "block", "block", "layer"]
    assert q.quant_config["reconstruction"]["qdrop"] == 0.5
    assert q.quant_config["reconstruction"]["learn_act_scale"] is True
    steps = [c for c in calls if c[2]["stage"] == "reconstruct"]
    assert steps[-1][0] == steps[-1][1] == 5 * 25 and all(math.isfinite(c[2]["loss"]) for c in steps)
    err_b = (q(images).detach() - ref).pow(2).mean()
    err_n = (near(images).detach() - ref).pow(2).mean()
    assert err_b < err_n, (err_b, err_n)


class TwoInputs(nn.Module):
    """A residual module called with two tensors: BRECQ cannot cache one input for it."""

    def __init__(self, c):
        super().__init__()
        self.a, self.b, self.act = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1), nn.ReLU()

    def forward(self, x, skip):
        return self.act(self.b(self.act(self.a(x))) + skip)


def test_brecq_falls_back_to_the_layers_of_a_block_that_takes_two_tensors(images):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.r, self.blk, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), TwoInputs(4), nn.Linear(4, 3)

        def forward(self, x):
            x = self.r(self.c(x))
            return self.fc(self.blk(x, x).mean((2, 3)))

    torch.manual_seed(0)
    q = quantize(Net().eval(), images, "W4A4", preset="hw", method="brecq", iterations=2, batch_size=8)
    assert [(u["name"], u["kind"]) for u in q.quant_config["units"]] == [
        ("c", "layer"), ("blk.a", "layer"), ("blk.b", "layer"), ("fc", "layer")]


def test_torchvision_block_with_inplace_relu(images):
    tv = pytest.importorskip("torchvision.models.resnet")
    torch.manual_seed(0)
    ds = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), tv.BasicBlock(8, 16, stride=2, downsample=ds),
                                        nn.Flatten(), nn.Linear(16 * 16, 3)))
    q = quantize(model, images, "W16A16", method="brecq", iterations=2, batch_size=16, input_bits=16)
    assert [u["kind"] for u in q.quant_config["units"]] == ["layer", "block", "layer"]
    assert len(q.quant_config["folded_bn"]) == 3
    ref = model(images)
    assert (q(images).detach() - ref).abs().max() < 5e-3 * ref.abs().max()


def test_host_streamed_cache_equals_in_memory(net, images):
    outs = {}
    for cache in ("host", "device", "recompute"):
        q = quantize(net, images, "W4A4", preset="academic", method="brecq", iterations=8, batch_size=16,
                     qdrop=0.5, cache=cache)
        outs[cache] = q(images).detach()
        if cache != "host":
            torch.testing.assert_close(outs[cache], outs["host"], atol=1e-5, rtol=0)
    # LSQ moved the (free) activation scales away from their calibrated values
    near = quantize(net, images, "W4A4", preset="academic")
    assert not torch.equal(q.model.block1.conv2.input_quantizer.scale, near.model.block1.conv2.input_quantizer.scale)


# ---------------------------------------------------------------- export
def test_save_load_round_trip(net, images, tmp_path):
    q = quantize(net, images, "W4A4", preset="academic", method="adaround", iterations=5, batch_size=16)
    path = tmp_path / "q.pt"
    save_quantized(q, path)
    raw = torch.load(path, weights_only=True)
    assert raw["state_dict"]["model.block1.conv1.w_int"].dtype == torch.uint8
    assert not any(k.endswith(".weight") for k in raw["state_dict"])  # no float weights left
    fresh = TinyResNet()  # the float architecture, untrained: only the structure matters
    r = load_quantized(path, fresh)
    assert r.quant_config == q.quant_config
    torch.testing.assert_close(r(images), q(images), atol=0, rtol=0)
    assert zsq_fast.load_quantized is load_quantized
    with pytest.raises(ValueError, match="architecture"):
        load_quantized(path, nn.Sequential(nn.Conv2d(3, 8, 3)))


@pytest.mark.parametrize("preset", ["hw", "academic"])
def test_onnx_round_trip(net, images, tmp_path, preset):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    q = quantize(net, images, "W4A4", preset=preset)
    path = tmp_path / "q.onnx"
    zsq_fast.export_onnx(q, path, images[:2])
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    x = images[:8]  # another batch size than the example: dynamic batch axis
    want = q(x).detach().numpy()
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), plain, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    # default optimizations: hw is exact (tests/test_onnx_export.py); academic's float bias is re-rounded to int32
    # by onnxruntime, a few steps at most
    fused = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    step = float(q.output_quantizer.scale) if q.output_quantizer is not None else 0.0
    assert (fused.argmax(1) == want.argmax(1)).mean() >= 0.75
    assert np.abs(fused - want).max() <= 0.05 * np.abs(want).max() + step


def test_onnx_refuses_more_than_8_bits(net, images, tmp_path):
    q = quantize(net, images, "W16A16", calibration="minmax")
    with pytest.raises(ValueError, match="8 bits"):
        zsq_fast.export_onnx(q, tmp_path / "q.onnx", images[:2])


def test_top_level_api_is_callable(net, images):
    import inspect

    import zsq_fast.quantize  # noqa: F401  (the package import must not hide the function)
    assert "calibration" in inspect.signature(zsq_fast.quantize).parameters
    q = zsq_fast.quantize(net, images, "W8A8")
    assert isinstance(q, QuantizedModel) and all(m.rounding == "frozen" for m in q.modules()
                                                  if isinstance(m, QUANT_LAYERS))


def test_hw_qdrop_caches_agree_when_a_layer_reads_a_view_of_a_site():
    """pool -> torch.flatten -> fc: fc reads a view of the pool site and applies its quantizer again. The fc unit
    used to learn that scale (LSQ + QDrop), on a host cache whose input was on the grid already, while the
    recompute cache re-ran the pool with QDrop on: the two caches gave different models."""
    torch.manual_seed(0)
    model = randomize_bn(CifarResNet(8).eval())
    images = torch.rand(32, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    out, units = {}, {}
    for cache in ("host", "recompute"):
        q = quantize(model, images, "W4A4", preset="hw", method="brecq", iterations=20, batch_size=8, cache=cache,
                     act_lr=0.05, qdrop=0.5)
        out[cache], units[cache] = q(images).detach(), [u["loss"] for u in q.quant_config["units"]]
    assert units["recompute"] == pytest.approx(units["host"], rel=1e-4)
    torch.testing.assert_close(out["recompute"], out["host"], atol=1e-5, rtol=0)


def _folded(model: nn.Module, x: torch.Tensor) -> nn.Module:
    import copy
    model = copy.deepcopy(model)
    fold_bn(model, trace_model(model, x[:1]).bn_pairs)
    return model


def test_hw_sites_record_the_activation_fused_into_a_layer():
    """conv -> (folded BN) -> ReLU module: the ReLU's output is the conv's site, and BRECQ may reconstruct the pair
    as one unit only when that activation call is the only reader of the conv's output."""

    class Head(nn.Module):
        def __init__(self, combine):
            super().__init__()
            self.conv, self.act, self.act2 = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.ReLU()
            self.flat, self.head, self.combine = nn.Flatten(), nn.Conv2d(4, 2, 1), combine

        def forward(self, x):
            return self.head(self.combine(self, self.conv(x)))

    from zsq_fast.quantize.sites import find_sites
    x = torch.randn(2, 3, 8, 8)
    q = quantize(CifarResNet(8).eval(), x, "W8A8", preset="hw")
    names = [s["name"] for s in q.quant_config["sites"]]
    assert "relu" in names and "conv1" not in names
    found = find_sites(_folded(CifarResNet(8).eval(), x), x, ["layer1.0", "layer2.0", "layer3.0"],
                       ["conv1", "linear"])
    assert found.fused_act == {"conv1": "relu"}
    cases = {"only reader": (lambda m, y: m.act(y), {"conv": "act"}),
             "two activation modules": (lambda m, y: m.act(y) + m.act2(y), {}),
             "one module called twice": (lambda m, y: m.act(y) + m.act(y), {}),
             "a functional op reads it too": (lambda m, y: m.act(y) + y, {}),
             "a view reads it too": (lambda m, y: m.act(y) + m.flat(y).view_as(y), {})}
    for case, (combine, want) in cases.items():
        assert find_sites(Head(combine).eval(), x, [], ["conv", "head"]).fused_act == want, case


def test_brecq_reconstructs_a_layer_with_its_fused_activation(monkeypatch):
    """BRECQ's layer reconstruction includes the activation: the stem's target is the float ReLU output and the
    ReLU's site scale (hw) is among the scales learned with it (no unit learned it before). Host and recompute
    caches agree."""
    import sys
    brecq = sys.modules["zsq_fast.quantize.brecq"]
    real = brecq.reconstruct
    seen = {}

    def spy(unit, layers, data, cfg, gen, *args, **kw):
        seen.setdefault(id(unit), (kw.get("tail"), [id(q) for q in kw["site_quantizers"]],
                                   data.get(torch.arange(data.n))["y_fp"]))
        return real(unit, layers, data, cfg, gen, *args, **kw)

    monkeypatch.setattr(brecq, "reconstruct", spy)
    torch.manual_seed(0)
    model = randomize_bn(CifarResNet(8).eval())
    images = torch.rand(32, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    out = {}
    for cache in ("host", "recompute"):
        seen.clear()
        q = quantize(model, images, "W4A4", preset="hw", method="brecq", iterations=40, batch_size=8, cache=cache,
                     act_lr=0.1)
        assert q.quant_config["units"][0] == {**q.quant_config["units"][0], "name": "conv1",
                                              "with_activation": "relu"}
        assert all("with_activation" not in u for u in q.quant_config["units"][1:])
        relu_q = q.site_quantizers[[s["name"] for s in q.quant_config["sites"]].index("relu")]
        tail, learned, y_fp = seen[id(q.model.conv1)]
        assert tail is q.model.relu and id(relu_q) in learned
        fp = _folded(model, images)
        torch.testing.assert_close(y_fp, fp.relu(fp.conv1(images)))  # the target is after the activation
        out[cache] = q(images).detach()
    torch.testing.assert_close(out["recompute"], out["host"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_activation_scale_rate_is_cosine_annealed(monkeypatch, net, images, schedule):
    """BRECQ and QDrop anneal the LSQ rate of the activation scales to 0 (CosineAnnealingLR), the default;
    "constant" keeps it."""
    import dataclasses
    import sys
    brecq = sys.modules["zsq_fast.quantize.brecq"]
    real = brecq.reconstruct
    monkeypatch.setattr(brecq, "reconstruct", lambda unit, layers, data, cfg, *a, **kw: real(
        unit, layers, data, dataclasses.replace(cfg, act_lr_schedule=schedule), *a, **kw))
    rates = []

    class Recording(torch.optim.Adam):
        def step(self, closure=None):
            if all(p.numel() == 1 for g in self.param_groups for p in g["params"]):  # the scales' optimizer
                rates.append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "Adam", Recording)
    q = quantize(net, images, "W4A4", preset="hw", method="brecq", iterations=10, batch_size=16, act_lr=0.02)
    if schedule == "cosine":
        assert q.quant_config["reconstruction"]["act_lr_schedule"] == "cosine"  # the default
    per_unit = [rates[i:i + 10] for i in range(0, len(rates), 10)]
    assert len(per_unit) == 5 and all(len(u) == 10 for u in per_unit)
    for unit in per_unit:
        first = unit[0]
        want = [first * (1 + math.cos(math.pi * t / 10)) / 2 if schedule == "cosine" else first for t in range(10)]
        assert unit == pytest.approx(want, rel=1e-6)
    with pytest.raises(zsq_fast.errors.InvalidArgumentError, match="act_lr_schedule"):
        ReconConfig(act_lr_schedule="cos")

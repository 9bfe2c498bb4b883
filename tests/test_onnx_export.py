"""ONNX export as onnxruntime runs it (default session options): same predictions and logits as the fake-quant
model; the hw simulation is integer-true (bias on the int32 grid); evaluate_onnx."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_bn
from torch import nn

import zsq_fast
from zsq_fast.evaluate import accuracy
from zsq_fast.models.cifar_resnet import CifarResNet
from zsq_fast.quantize import quantize
from zsq_fast.quantize.modules import QUANT_LAYERS

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def net():
    """ResNet-8 (CIFAR layout: option-A shortcuts, residual adds, last linear) with non-trivial BN statistics."""
    torch.manual_seed(0)
    return randomize_bn(CifarResNet(8))


@pytest.fixture(scope="module")
def calib():
    torch.manual_seed(1)
    return torch.randn(64, 3, 16, 16)


@pytest.fixture(scope="module")
def test_images():
    torch.manual_seed(2)
    return torch.randn(1024, 3, 16, 16)


def _export(q, path, **kw):
    zsq_fast.export_onnx(q, path, torch.zeros(1, 3, 16, 16), **kw)
    return onnx.load(str(path))


def _initializer_types(model):
    """Element type of every constant: initializers and Constant nodes."""
    types = {t.name: t.data_type for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            types[n.output[0]] = onnx.helper.get_attribute_value(n.attribute[0]).data_type
    return types


@pytest.mark.parametrize("bits", ["W8A8", "W4A8", "W4A4", "W3A3", "W2A2"])
def test_default_onnxruntime_matches_fake_quant(net, calib, test_images, tmp_path, bits):
    q = quantize(net, calib, bits, preset="hw")
    path = tmp_path / "q.onnx"
    _export(q, path)
    r = zsq_fast.evaluate_onnx(path, test_images, reference=q, threads=1)
    assert r["n"] == 1024 and "default session options" in r["runtime"]
    assert r["agreement"] >= 99.9, r
    assert r["max_logit_diff_steps"] <= 1.0, r
    # and the same with every optimization off: the graph itself is the simulated model
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    got = ort.InferenceSession(str(path), plain, providers=["CPUExecutionProvider"]).run(
        None, {"input": test_images[:64].numpy()})[0]
    with torch.no_grad():
        want = q(test_images[:64]).numpy()
    step = float(q.output_quantizer.effective_scale())
    assert np.abs(got - want).max() <= step


def test_w8a8_runs_on_integer_kernels(net, calib, tmp_path):
    """At 8 bits onnxruntime's default optimizations do replace the QDQ pattern by integer kernels
    (QLinearConv, QGemm: int32 accumulation, requantization), so the agreement test above covers them."""
    q = quantize(net, calib, "W8A8", preset="hw")
    _export(q, tmp_path / "q.onnx")
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "q.onnx"), opts, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert {"QLinearConv", "QGemm"} <= ops


def test_export_carries_the_bit_widths(net, calib, tmp_path):
    T = onnx.TensorProto
    q = quantize(net, calib, "W4A4", preset="hw", input_bits=4)  # the image at 4 bits too (default: 8)
    m = _export(q, tmp_path / "w4a4.onnx")
    assert {o.domain: o.version for o in m.opset_import}.get("", 0) == 21
    types = _initializer_types(m)
    assert types["model.conv1.w_int"] == T.INT4 and types["model.linear.w_int"] == T.INT4
    dq_bias = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and types.get(n.input[0]) == T.INT32]
    assert len(dq_bias) == sum(1 for x in q.modules() if isinstance(x, QUANT_LAYERS) and x.bias is not None)
    q_types = {types[n.input[2]] for n in m.graph.node if n.op_type == "QuantizeLinear"}
    assert q_types <= {T.INT4, T.UINT4} and T.UINT4 in q_types  # after ReLU: unsigned
    assert not any(n.op_type == "Clip" for n in m.graph.node)  # 4 bits fill INT4: nothing to clip
    assert all(n.domain in ("", "ai.onnx") for n in m.graph.node)

    # 3 bits: weights still INT4 (exact), activations int8 behind a Clip to the 3-bit range
    q3 = quantize(net, calib, "W3A3", preset="hw", input_bits=3)
    m3 = _export(q3, tmp_path / "w3a3.onnx")
    t3 = _initializer_types(m3)
    assert t3["model.layer1.0.conv1.w_int"] == T.INT4
    qs = [n for n in m3.graph.node if n.op_type == "QuantizeLinear"]
    assert {t3[n.input[2]] for n in qs} <= {T.INT8, T.UINT8}
    producers = {o: n for n in m3.graph.node for o in n.output}
    assert all(producers[n.input[0]].op_type == "Clip" for n in qs)


def test_relu6_before_a_4_bit_quantizer(calib, test_images, tmp_path):
    """A Clip of the model (ReLU6) right before a 4-bit QuantizeLinear: exported as int8 + Clip, which
    onnxruntime 1.32 can load (its ClipQuantFusion fails on Clip -> INT4/UINT4 QuantizeLinear)."""
    torch.manual_seed(4)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 8, 3, padding=1),
                      nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    q = quantize(m, calib, "W4A4", preset="hw", input_bits=4)
    model = _export(q, tmp_path / "relu6.onnx")
    producers = {o: n for n in model.graph.node for o in n.output}
    after_clip = [n for n in model.graph.node if n.op_type == "QuantizeLinear"
                  and getattr(producers.get(n.input[0]), "op_type", None) == "Clip"]
    types = _initializer_types(model)
    assert after_clip and all(types[n.input[2]] == onnx.TensorProto.UINT8 for n in after_clip)
    # the other 4-bit activations (network input, pooled features -- quantized by the pool and, on the same grid,
    # again after nn.Flatten so that the Gemm reads a DequantizeLinear -- and the logits) are still 4-bit tensors
    others = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n not in after_clip]
    assert len(others) == 4 and {types[n.input[2]] for n in others} <= {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
    r = zsq_fast.evaluate_onnx(tmp_path / "relu6.onnx", test_images, reference=q, threads=1)
    assert r["agreement"] >= 99.9 and r["max_logit_diff_steps"] <= 1.0, r


def test_opset_13_emulates_low_bits_with_clip(net, calib, test_images, tmp_path):
    q = quantize(net, calib, "W4A4", preset="hw")
    m = _export(q, tmp_path / "q13.onnx", opset=13)
    assert {o.domain: o.version for o in m.opset_import}[""] == 13
    assert onnx.TensorProto.INT4 not in _initializer_types(m).values()
    assert any(n.op_type == "Clip" for n in m.graph.node)
    r = zsq_fast.evaluate_onnx(tmp_path / "q13.onnx", test_images, reference=q, threads=1)
    assert r["agreement"] >= 99.9 and r["max_logit_diff_steps"] <= 1.0, r


@pytest.mark.parametrize("opset", [12, 22, "21", True])
def test_export_refuses_unsupported_opsets(net, calib, tmp_path, opset):
    q = quantize(net, calib, "W4A4", preset="hw")
    with pytest.raises((ValueError, TypeError), match="opset"):  # a str or bool is a type error
        zsq_fast.export_onnx(q, tmp_path / "q.onnx", torch.zeros(1, 3, 16, 16), opset=opset)


def test_hw_layer_is_integer_true(net, calib):
    """A hw layer's output, divided by s_x s_w, is exactly the int32 accumulator sum(x_int w_int) + b_int."""
    q = quantize(net, calib, "W4A4", preset="hw")
    layer = q.model.layer2[0].conv1
    assert layer.int32_bias and q.quant_config["layers"]["layer2.0.conv1"]["bias"] == "int32"
    torch.manual_seed(3)
    x = torch.rand(4, 16, 16, 16) * 3
    qmin, qmax = layer.input_quantizer.spec.qrange
    x_int = torch.clamp(torch.round(x / layer.input_quantizer.effective_scale()), qmin, qmax)
    acc = F.conv2d(x_int.double(), layer.w_int.double(), None, layer.stride, layer.padding)
    b_int = layer.integer_bias().double()
    assert torch.equal(b_int, torch.round(b_int)) and b_int.abs().max() > 0
    acc = acc + b_int.view(1, -1, 1, 1)
    with torch.no_grad():  # under hw the layer's input arrives on the grid (its producer quantized it)
        x_q = x_int * layer.input_quantizer.effective_scale()
        y = layer(x_q).double() / layer.bias_scale().double().view(1, -1, 1, 1)
    assert torch.equal(y, acc)


def test_academic_and_wide_layers_keep_a_float_bias(net, calib):
    qa = quantize(net, calib, "W4A4", preset="academic")
    assert all(c["bias"] == "float" for c in qa.quant_config["layers"].values())
    q16 = quantize(net, calib, "W16A16", preset="hw", calibration="minmax")  # no int32 kernel at 16 bits
    assert all(c["bias"] == "float" for c in q16.quant_config["layers"].values())


def test_int32_bias_survives_save_and_load(net, calib, tmp_path):
    q = quantize(net, calib, "W4A4", preset="hw")
    zsq_fast.save_quantized(q, tmp_path / "q.pt")
    r = zsq_fast.load_quantized(tmp_path / "q.pt", CifarResNet(8))
    assert r.model.conv1.int32_bias
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(r(x), q(x))


def test_files_saved_before_the_int32_bias_load_with_a_float_bias(net, calib, tmp_path):
    import json

    q = quantize(net, calib, "W4A4", preset="hw")
    zsq_fast.save_quantized(q, tmp_path / "q.pt")
    payload = torch.load(tmp_path / "q.pt", weights_only=True)
    config = json.loads(payload["config"])
    for layer in config["layers"].values():
        del layer["bias"]  # what an older zsq_fast wrote
    payload["config"] = json.dumps(config)
    del payload["sha256"]  # older files have no checksum either
    torch.save(payload, tmp_path / "old.pt")
    r = zsq_fast.load_quantized(tmp_path / "old.pt", CifarResNet(8))
    assert not any(m.int32_bias for m in r.modules() if isinstance(m, QUANT_LAYERS))


def test_evaluate_onnx_reports_top1_and_rejects_bad_files(net, calib, tmp_path):
    q = quantize(net, calib, "W8A8", preset="hw")
    _export(q, tmp_path / "q.onnx")
    x = torch.randn(10, 3, 16, 16)
    labels = torch.arange(10) % 3
    with torch.no_grad():
        want = 100 * accuracy(q(x), labels)
    r = zsq_fast.evaluate_onnx(tmp_path / "q.onnx", x, labels=labels, batch_size=3)  # 3 does not divide 10
    assert r["top1"] == pytest.approx(want, abs=1e-3) and r["n"] == 10 and "agreement" not in r
    with pytest.raises(FileNotFoundError, match="not found"):
        zsq_fast.evaluate_onnx(tmp_path / "missing.onnx", x)
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="onnxruntime cannot load"):
        zsq_fast.evaluate_onnx(tmp_path / "bad.onnx", x)
    with pytest.raises(TypeError, match="float tensor"):
        zsq_fast.evaluate_onnx(tmp_path / "q.onnx", x.numpy())
    with pytest.raises(ValueError, match="labels"):
        zsq_fast.evaluate_onnx(tmp_path / "q.onnx", x, labels=labels[:3])


def test_real_resnet20_w4a4_export_is_what_was_measured(shared_data, tmp_path):
    """Issue 14's case: CIFAR-10 ResNet-20 W4A4 hw, real calibration (the old export: 89 % agreement)."""
    from zsq_fast.data import load_images_for
    from zsq_fast.models import resnet20
    from zsq_fast.models.zoo import IMAGENET_MEAN, IMAGENET_STD

    m = resnet20()
    m.load_state_dict(torch.load(shared_data / "weights" / "cifar10_resnet20.pt", map_location="cpu",
                                 weights_only=True))
    calib = load_images_for(str(shared_data / "cifar10_train_subset.npz"), IMAGENET_MEAN, IMAGENET_STD, 32, limit=256)
    test = load_images_for(str(shared_data / "cifar10_test_exact1017.npz"), IMAGENET_MEAN, IMAGENET_STD, 32,
                           limit=300)
    q = quantize(m.eval(), calib.take(range(calib.n))[0], "W4A4", preset="hw")
    zsq_fast.export_onnx(q, tmp_path / "r20.onnx", torch.zeros(1, 3, 32, 32))
    r = zsq_fast.evaluate_onnx(tmp_path / "r20.onnx", test, reference=q, threads=1)
    assert r["agreement"] >= 99.9 and r["max_logit_diff_steps"] <= 1.0, r  # bit-exact on the dev machine
    assert r["top1"] > 60


AVX2_ONLY = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse sse2 ssse3 avx avx2 fma\n"


def test_int8_saturation_is_detected_from_the_cpu_flags():
    from zsq_fast.onnx_eval import int8_saturates
    assert int8_saturates(AVX2_ONLY, "x86_64")
    assert not int8_saturates(AVX2_ONLY.replace("avx2", "avx2 avx512f avx512_vnni"), "x86_64")
    assert not int8_saturates(AVX2_ONLY.replace("avx2", "avx2 avx_vnni"), "AMD64")
    assert not int8_saturates(AVX2_ONLY, "aarch64")  # ARM accumulates int8 dot products in int32
    assert int8_saturates("processor\t: 0\n", "x86_64")  # no flags line: assume the worst


def test_exact_int8_option_and_its_report(net, calib, test_images, tmp_path, monkeypatch):
    """W8A8 on onnxruntime's integer kernels: with the exact-int8 option the export matches the fake-quant model on
    every CPU; the report then also gives what the plain default options compute on this CPU (on an AVX2-only
    x86 CPU they saturate), the same as a plain run."""
    import zsq_fast.onnx_eval as onnx_eval
    q = quantize(net, calib, "W8A8", preset="hw")
    path = tmp_path / "q.onnx"
    _export(q, path)
    x = test_images[:256]
    exact = zsq_fast.evaluate_onnx(path, x, reference=q, threads=1, exact_int8=True)
    plain = zsq_fast.evaluate_onnx(path, x, reference=q, threads=1, exact_int8=False)
    assert exact["agreement"] == 100.0 and exact["max_logit_diff_steps"] <= 1.0, exact
    assert onnx_eval.EXACT_INT8[0] in exact["runtime"] and "asked for" in exact["runtime"]
    assert "default_options" not in plain and onnx_eval.EXACT_INT8[0] not in plain["runtime"]
    assert exact["default_options"] == {k: plain[k] for k in ("agreement", "max_abs_logit_diff",
                                                              "max_logit_diff_steps")}
    single = zsq_fast.evaluate_onnx(path, x, reference=q, threads=1, exact_int8=True, compare_default_options=False)
    assert single == {k: v for k, v in exact.items() if k != "default_options"}  # one pass, same numbers
    if not onnx_eval.int8_saturates():
        assert plain["agreement"] >= 99.5 and plain["max_logit_diff_steps"] <= 1.0, plain
    monkeypatch.setattr(onnx_eval, "int8_saturates", lambda: True)  # what an AVX2-only CPU gets without asking
    auto = zsq_fast.evaluate_onnx(path, x[:32], reference=q, threads=1)
    assert "no VNNI" in auto["runtime"] and "default_options" in auto

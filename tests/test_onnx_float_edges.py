"""float_edges (a float tensor crossing between quantized ops in an ONNX graph) and regrid_views (a view of a
quantized tensor, e.g. ShuffleNet's channel split, gets its grid back before a data op), on hand-made graphs."""
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from zsq_fast.quantize.onnx_qdq import float_edges, regrid_views  # noqa: E402


def _model(nodes, out_channels=4):
    inits = [numpy_helper.from_array(np.float32(0.25), "s"), numpy_helper.from_array(np.int8(0), "z"),
             numpy_helper.from_array(np.array([2, 2], dtype=np.int64), "halves")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out_channels, 2, 2])
    g = helper.make_graph(nodes, "g", [x], [y], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


def _qdq(src, name):
    return [helper.make_node("QuantizeLinear", [src, "s", "z"], [f"{name}_q"]),
            helper.make_node("DequantizeLinear", [f"{name}_q", "s", "z"], [name])]


def _split_concat():
    """x -> Q/DQ -> split in halves; the first half and Q/DQ(sigmoid(second half)) concatenated (ShuffleNet)."""
    return [*_qdq("x", "xq"), helper.make_node("Split", ["xq", "halves"], ["a", "b"], axis=1),
            helper.make_node("Sigmoid", ["b"], ["bs"]), *_qdq("bs", "bq"),
            helper.make_node("Concat", ["a", "bq"], ["y"], axis=1)]


def test_a_view_of_a_quantized_tensor_feeding_concat_is_an_edge_until_regridded():
    m = _model(_split_concat())
    assert float_edges(m) == [": a"]
    x = np.random.default_rng(0).normal(size=(1, 4, 2, 2)).astype(np.float32)
    before = ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]
    nodes = regrid_views(list(m.graph.node))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    onnx.checker.check_model(m)
    assert float_edges(m) == []
    after = ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_array_equal(before, after)  # the half was on the grid already


def test_a_max_pool_of_a_quantized_tensor_is_regridded_too():
    """Inception's F.max_pool2d branch goes straight into torch.cat: the max of grid values is on the grid."""
    nodes = [*_qdq("x", "xq"), helper.make_node("MaxPool", ["xq"], ["p"], kernel_shape=[1, 1]),
             helper.make_node("Split", ["p", "halves"], ["a", "b"], axis=1), helper.make_node("Concat", ["b", "a"], ["y"], axis=1)]
    m = _model(nodes)
    assert float_edges(m) == [": b", ": a"]
    nodes = regrid_views(list(m.graph.node))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    assert float_edges(m) == []


def test_silu_inside_an_activation_is_not_an_edge_but_a_float_operand_is():
    silu = [*_qdq("x", "xq"), helper.make_node("Sigmoid", ["xq"], ["sg"]), helper.make_node("Mul", ["xq", "sg"], ["m"]),
            *_qdq("m", "y")]
    assert float_edges(_model(silu)) == []
    gate = [*_qdq("x", "xq"), helper.make_node("Sigmoid", ["x"], ["sg"]), helper.make_node("Mul", ["xq", "sg"], ["y"])]
    assert float_edges(_model(gate)) == [": sg"]  # a gate computed from the float input

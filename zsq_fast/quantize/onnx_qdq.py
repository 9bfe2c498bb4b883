"""The ONNX form of the quantized model: QuantizeLinear/DequantizeLinear that onnxruntime runs as simulated.

torch.onnx (TorchScript exporter, opset <= 20) cannot write 4-bit tensors, so the export is two steps:
1. while tracing, each activation quantizer becomes a node zsq_fast::QuantizeDequantize and each frozen
   weight a node zsq_fast::DequantizeWeight, carrying scale, zero point, bit width and signedness as
   attributes (the spec, not a guess from values); an int32 bias is a standard DequantizeLinear;
2. lower_qdq() replaces them by standard nodes for the target opset:
     weights of <= 4 bits, opset >= 21        INT4/UINT4 initializers -> DequantizeLinear
     4-bit activations, opset >= 21            INT4/UINT4 QuantizeLinear -> DequantizeLinear
     otherwise                                 int8/uint8 QuantizeLinear -> DequantizeLinear
   with a Clip to [(qmin - z) s, (qmax - z) s] before an activation's QuantizeLinear wherever the grid
   is narrower than int8 (clipping the float before rounding gives the integers that saturating would).
   2-3 bit activations, and 4-bit ones right after a Clip of the model (ReLU6), stay int8 + Clip:
   onnxruntime 1.32's ClipQuantFusion fails on a Clip feeding an INT4/UINT4 QuantizeLinear. So do 4-bit ones
   read by a MaxPool: with equal grids on both sides onnxruntime drops the Q/DQ around it and runs MaxPool on
   the stored type, which it has no UINT4 kernel for (ShuffleNet V2 at W4A4 failed to load).

Why this is what onnxruntime runs: its default optimizations keep a Clip that is narrower than the
QuantizeLinear range (it fuses it into the conv as a float activation, or leaves it), never fuse INT4
into integer kernels, and compute the rest from integers; the bias is the one value they re-round
(BiasQuantization: round(b / (s_x s_w)) to int32), which the hw preset already does (modules.py).
"""
from __future__ import annotations

import numpy as np
import torch

from ..ops import fake_quant

DOMAIN = "zsq_fast"
INT4_MIN_OPSET = 21
MAX_OPSET = 21


# ---------------------------------------------------------------- step 1: nodes written while tracing
class _QDQ(torch.autograd.Function):
    """Fake quantization of an activation; ONNX form zsq_fast::QuantizeDequantize."""

    @staticmethod
    def forward(ctx, x, scale, zp, qmin, qmax, bits, signed):
        s = torch.tensor([scale], dtype=torch.float32, device=x.device)
        z = torch.tensor([float(zp)], dtype=torch.float32, device=x.device)
        return fake_quant(x, s, z, qmin, qmax, None)

    @staticmethod
    def symbolic(g, x, scale, zp, qmin, qmax, bits, signed):
        y = g.op(f"{DOMAIN}::QuantizeDequantize", x, scale_f=scale, zero_point_i=zp, qmin_i=qmin, qmax_i=qmax,
                 bits_i=bits, signed_i=int(signed))
        y.setType(x.type())
        return y


def qdq_activation(x: torch.Tensor, q) -> torch.Tensor:
    """The Quantizer q applied to x, exportable (q is frozen: its scale is an exact power of two under pow2)."""
    sp = q.spec
    qmin, qmax = sp.qrange
    s = float(q.effective_scale().reshape(-1)[0])
    z = int(q.zero_point.reshape(-1)[0]) if not sp.symmetric else 0
    return _QDQ.apply(x, s, z, qmin, qmax, sp.bits, sp.signed)


class _DQWeight(torch.autograd.Function):
    """w_hat = s (w_int - z) per output channel; ONNX form zsq_fast::DequantizeWeight(w_int)."""

    @staticmethod
    def forward(ctx, w_int, scales, zero_points, bits, signed):
        shape = (-1,) + (1,) * (w_int.dim() - 1)
        s = torch.tensor(scales, dtype=torch.float32, device=w_int.device).view(shape)
        z = torch.tensor(zero_points, dtype=torch.float32, device=w_int.device).view(shape)
        return (w_int.float() - z) * s

    @staticmethod
    def symbolic(g, w_int, scales, zero_points, bits, signed):
        y = g.op(f"{DOMAIN}::DequantizeWeight", w_int, scales_f=scales, zero_points_i=zero_points, bits_i=bits,
                 signed_i=int(signed))
        y.setType(w_int.type().with_dtype(torch.float32))
        return y


def dq_weight(layer) -> torch.Tensor:
    q = layer.weight_quantizer
    sp = q.spec
    scales = q.effective_scale().float().tolist()
    zps = q.zero_point.detach().round().long().tolist()
    return _DQWeight.apply(layer.w_int, scales, zps, sp.bits, sp.signed)


class _DQBias(torch.autograd.Function):
    """b_hat = (s_x s_w) b_int32 per output channel; ONNX form DequantizeLinear(int32 b, s_x s_w, axis=0)."""

    @staticmethod
    def forward(ctx, b_int, scale):
        return b_int.float() * scale

    @staticmethod
    def symbolic(g, b_int, scale):
        return g.op("DequantizeLinear", b_int, scale, axis_i=0)


def dq_bias(layer) -> torch.Tensor:
    # built from Python values so the trace records constants (the int32 initializer), not the float bias
    ints = layer.integer_bias().long().tolist()
    scales = layer.bias_scale().float().tolist()
    b_int = torch.tensor(ints, dtype=torch.int32, device=layer.bias.device)
    return _DQBias.apply(b_int, torch.tensor(scales, dtype=torch.float32, device=layer.bias.device))


# ---------------------------------------------------------------- step 2: lowering to standard QDQ
def storage(bits: int, signed: bool, opset: int) -> tuple[int, int, int]:
    """(onnx TensorProto type, type min, type max) that holds a `bits`-wide grid at this opset."""
    from onnx import TensorProto

    if bits <= 4 and opset >= INT4_MIN_OPSET:
        return (TensorProto.INT4, -8, 7) if signed else (TensorProto.UINT4, 0, 15)
    return (TensorProto.INT8, -128, 127) if signed else (TensorProto.UINT8, 0, 255)


def lower_qdq(model, opset: int):
    """Replace the zsq_fast:: nodes of an exported onnx.ModelProto by standard QDQ nodes at `opset`."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)

    def read_by_view(name):  # directly, or through an Identity
        return any(moves_values(r) and (r.op_type != "Identity" or read_by_view(r.output[0]))
                   for r in readers.get(name, ()))

    def read_by_moving_op(name):  # directly, or through an Identity (onnxruntime drops it)
        return any(r.op_type in MOVING_OPS or (r.op_type == "Identity" and read_by_moving_op(r.output[0]))
                   for r in readers.get(name, ()))

    for n in graph.node:  # a ReLU of a grid that starts at 0 (a functional ReLU fused into its site) is the identity
        src = producer.get(n.input[0]) if n.op_type == "Relu" else None
        if src is not None and src.domain == DOMAIN and src.op_type == "QuantizeDequantize":
            a = {at.name: helper.get_attribute_value(at) for at in src.attribute}
            if a["qmin"] - a["zero_point"] >= 0:
                n.op_type = "Identity"
    nodes = []
    lowered: set[str] = set()  # weight initializers already rewritten to their storage type
    for n in graph.node:
        if n.domain != DOMAIN:
            nodes.append(n)
            continue
        a = {at.name: helper.get_attribute_value(at) for at in n.attribute}
        base = n.name or n.output[0]
        bits = a["bits"]
        if n.op_type == "QuantizeDequantize":
            after_clip = n.input[0] in producer and producer[n.input[0]].op_type == "Clip"
            if bits < 4 or after_clip or read_by_moving_op(n.output[0]):
                bits = 8
        signed = bool(a["signed"])
        shift = 0  # added to the zero point and to the integers: the same grid in another storage type
        if n.op_type == "QuantizeDequantize" and signed and bits == 8 and read_by_view(n.output[0]):
            # stored as uint8 with z + 128: onnxruntime's QDQ propagation copies this pair past the view with an
            # INT8 output_dtype sharing the zero point that its S8->U8 pass then turns to UINT8, and refuses the
            # model (timm resnest's rsoftmax: a signed conv output through Reshape/Transpose to a Softmax)
            signed, shift = False, 128
        dtype, tmin, tmax = storage(bits, signed, opset)

        def const(suffix, value, dt=None):
            name = f"{base}/{suffix}"
            arr = np.asarray(value)
            t = helper.make_tensor(name, dt, arr.shape, arr.flatten().tolist()) if dt is not None \
                else numpy_helper.from_array(arr, name)
            graph.initializer.append(t)
            return name

        if n.op_type == "QuantizeDequantize":
            s, z, qmin, qmax = np.float32(a["scale"]), a["zero_point"], a["qmin"], a["qmax"]
            x = n.input[0]
            if (qmin + shift, qmax + shift) != (tmin, tmax):  # the grid is narrower than the storage type
                lo, hi = np.float32((qmin - z) * s), np.float32((qmax - z) * s)
                nodes.append(helper.make_node("Clip", [x, const("clip_min", lo), const("clip_max", hi)],
                                              [f"{base}/clipped"], name=f"{base}/Clip"))
                x = f"{base}/clipped"
            sn, zn = const("scale", s), const("zero_point", z + shift, dtype)
            nodes.append(helper.make_node("QuantizeLinear", [x, sn, zn], [f"{base}/q"],
                                          name=f"{base}/QuantizeLinear"))
            nodes.append(helper.make_node("DequantizeLinear", [f"{base}/q", sn, zn], [n.output[0]],
                                          name=f"{base}/DequantizeLinear"))
        elif n.op_type == "DequantizeWeight":
            src = n.input[0]
            # the exporter keeps one copy of equal constants (two depthwise 1x1 weights of one BN-as-conv pattern),
            # the others reading it through Identity nodes
            while src not in inits and src in producer and producer[src].op_type == "Identity":
                src = producer[src].input[0]
            w = inits.get(src)
            if w is None:
                raise ValueError(f"ONNX export: the integer weight {n.input[0]!r} is not an initializer")
            values = numpy_helper.to_array(w)
            if values.min() < tmin or values.max() > tmax:
                raise ValueError(f"ONNX export: {n.input[0]} holds values outside [{tmin}, {tmax}]")
            ints = values.flatten().astype(np.int64).tolist()
            if src in lowered:  # shared: this reader gets its own copy in its own storage type
                w = helper.make_tensor(f"{base}/w_int", dtype, values.shape, ints)
                graph.initializer.append(w)
            else:
                w.CopyFrom(helper.make_tensor(w.name, dtype, values.shape, ints))
                lowered.add(src)
            scales = np.asarray(a["scales"], dtype=np.float32)
            zps = np.asarray(a["zero_points"], dtype=np.int64)
            inputs = [w.name, const("scale", scales), const("zero_point", zps, dtype)]
            nodes.append(helper.make_node("DequantizeLinear", inputs, [n.output[0]], name=f"{base}/DequantizeLinear",
                                          axis=0))
        else:
            raise ValueError(f"ONNX export: unknown node {DOMAIN}::{n.op_type}")
    del graph.node[:]
    graph.node.extend(regrid_views(nodes))
    imports = [op for op in model.opset_import if op.domain != DOMAIN]
    for op in imports:
        if op.domain in ("", "ai.onnx"):
            op.version = opset
    del model.opset_import[:]
    model.opset_import.extend(imports)
    return model


# ops whose output values are some of their input's values (a channel split, a shuffle's reshape/transpose, a max
# pool; a functional ReLU fused into its site, written as Identity by lower_qdq): their output is on the input's
# integer grid
VIEW_OPS = ("Slice", "Split", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "MaxPool",
            "Pad")  # a Pad of a grid tensor (same-padding convs pad with 0, on every grid) stays on it
DATA_OPS = ("Add", "Concat", "Conv", "Gemm", "MatMul", "Mul")
# ops that onnxruntime 1.32 runs on the stored type (dropping the Q/DQ around them) without an INT4/UINT4 kernel;
# Slice, Flatten and Reshape between 4-bit Q/DQ load and run (tests/test_torchvision_hw.py, test_onnx_export.py)
MOVING_OPS = ("MaxPool",)


def moves_values(node) -> bool:
    """The node's output values are some of its input's (VIEW_OPS, a nearest-neighbour Resize): on its grid."""
    if node.op_type in VIEW_OPS:
        return True
    return node.op_type == "Resize" and any(a.name == "mode" and a.s == b"nearest" for a in node.attribute)


def regrid_views(nodes):
    """Nodes with a QuantizeLinear/DequantizeLinear pair (the source's scale and zero point) put back on every edge
    where a view of an activation's DequantizeLinear (ShuffleNet's channel split: x.chunk(2) -> Slice; Inception's
    F.max_pool2d branch) feeds a data op (their torch.cat -> Concat). The values are already on that grid, so nothing changes numerically; the
    graph then says what an integer runtime runs (an int8 Slice), and the data op reads DequantizeLinear outputs
    only, so onnxruntime can fuse it into its integer kernel. Returns the nodes in topological order."""
    from onnx import helper

    producer = {o: n for n in nodes for o in n.output}

    def grid_source(name):
        seen_view = False
        while name in producer and moves_values(producer[name]):
            name, seen_view = producer[name].input[0], True
        n = producer.get(name)
        if seen_view and n is not None and n.op_type == "DequantizeLinear" and n.input[0] in producer \
                and producer[n.input[0]].op_type == "QuantizeLinear":
            return n
        return None

    out, made = [], {}
    for n in nodes:
        if n.op_type in DATA_OPS:
            for k, name in enumerate(n.input):
                dq = grid_source(name)
                if dq is None:
                    continue
                if name not in made:
                    base = f"{name}/regrid"
                    out.append(helper.make_node("QuantizeLinear", [name, *dq.input[1:]], [f"{base}/q"],
                                                name=f"{base}/QuantizeLinear"))
                    out.append(helper.make_node("DequantizeLinear", [f"{base}/q", *dq.input[1:]], [f"{base}/dq"],
                                                name=f"{base}/DequantizeLinear"))
                    made[name] = f"{base}/dq"
                n.input[k] = made[name]
        out.append(n)
    return out


_ACT_INNER = ("Sigmoid", "HardSigmoid", "Tanh", "Softplus")  # x * f(x): SiLU, Hardswish, Mish written as ops


def float_edges(model) -> list[str]:
    """The inputs of float data ops (Add, Concat, Conv, Gemm, MatMul, Mul) of an onnx.ModelProto that do not come out
    of a DequantizeLinear: each is a float tensor crossing between quantized ops ("node name: input name"); []
    when every tensor between ops is on an integer grid. An activation's own x * sigmoid(x) (SiLU fused into the
    conv before it, as integer kernels run it) is not an edge between ops, nor is a partial sum that only the next
    Add reads (a + b + c of RepVGG's branches: one n-ary add, its partial sums in the accumulator), nor an added
    constant 0, nor a result written into a Concat whose output is quantized (the op requantizes onto the concat's
    grid, as TFLite's concat does), nor arithmetic on the input's sizes."""
    import onnx

    g = onnx.shape_inference.infer_shapes(model).graph
    producer = {o: n for n in g.node for o in n.output}
    elem = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.output]}

    def applies_to(name, x):  # name = f(...f(x)) through the activations' unary ops
        while name in producer and producer[name].op_type in _ACT_INNER:
            name = producer[name].input[0]
            if name == x:
                return True
        return False

    readers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    data = {i.name for i in g.input}  # tensors computed from the image's values (not from its shape alone)
    for n in g.node:
        if n.op_type != "Shape" and any(i in data for i in n.input):
            data.update(n.output)
    zeros = {n.output[0] for n in g.node if n.op_type == "Constant" and n.attribute
             and not onnx.numpy_helper.to_array(n.attribute[0].t).any()}
    zeros |= {t.name for t in g.initializer if not onnx.numpy_helper.to_array(t).any()}

    def lands_on_grid(name):  # every reader quantizes it, or a Concat whose output every reader quantizes
        rs = readers.get(name, [])
        return bool(rs) and all(r.op_type == "QuantizeLinear" or (r.op_type == "Concat" and lands_on_grid(r.output[0]))
                                for r in rs)

    def mixed_grid(name):  # a Concat of grids (one grid per channel), maybe through views: no one grid to regrid to
        src = producer.get(name)
        if src is None:
            return False
        if moves_values(src):
            return mixed_grid(src.input[0])
        return src.op_type == "Concat" and all(
            (i in producer and producer[i].op_type == "DequantizeLinear") or mixed_grid(i) for i in src.input)

    def accepted(n, i):
        src = producer.get(i)
        if mixed_grid(i):
            return True  # GhostNetV2's cat([x1, x2])[:, :c] * gate: integers, a scale per channel
        if i in zeros and n.op_type == "Add":
            return True  # x + 0 (a branch that is absent: `identity_out = 0`)
        if src is None or len(readers.get(i, [])) != 1:
            return False
        if n.op_type == "Add" and src.op_type == "Add":
            return True  # a partial sum of an n-ary add
        # an op writing its result into a slice of a concat whose output is quantized (TFLite requantizes concat
        # inputs onto the output's grid): rexnet's / dpn's cat([a + b, c]), an adaptive pool's per-bin means
        return n.op_type == "Concat" and src.op_type in ("Add", "ReduceMean", "ReduceMax", "Concat") \
            and lands_on_grid(n.output[0])

    bad = []
    for n in g.node:
        if n.op_type not in DATA_OPS or elem.get(n.output[0]) != onnx.TensorProto.FLOAT:
            continue
        if not any(i in data for i in n.input):
            continue  # arithmetic on sizes (a dynamic "same" padding computed from the input's shape)
        if n.op_type == "Mul" and len(n.input) == 2 and (applies_to(n.input[1], n.input[0])
                                                          or applies_to(n.input[0], n.input[1])):
            continue
        bad += [f"{n.name}: {i}" for i in n.input
                if i and (i not in producer or producer[i].op_type != "DequantizeLinear") and not accepted(n, i)]
    return bad

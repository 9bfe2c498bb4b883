"""Quantized layers (Conv2d, Linear) built on the fused ops, and the output-quantizer wrapper.

A quantized layer computes  y = op(q_in(x), w_hat) + b  where q_in is its input activation quantizer
and w_hat its weight on the integer grid. How w_hat is made is the layer's `rounding`:
  "nearest"  w_hat = fake_quantize(w)                                  (round to nearest)
  "soft"     w_hat = adaround_quantize(w, V, beta) and self.reg = its rounding regularizer
  "hard"     w_hat = adaround_quantize(w, V, hard=True)                (h = 1[V >= 0])
  "frozen"   w_hat = s (w_int - z): the float weight is gone, only integers remain (after quantize())

With `int32_bias` (the hw preset) the bias is on the accumulator's grid, as an integer kernel adds it:
b_hat = s_x s_w clamp(round(b / (s_x s_w)), -2^31, 2^31 - 1) per output channel. With power-of-two
scales every term of op(q_in(x), w_hat) + b_hat is then an exact multiple of s_x s_w, so the float
simulation and an int32 accumulator (onnxruntime's QLinearConv, or its DequantizeLinear(int32 bias))
give the same numbers, and so does the output quantizer's rounding (half to even in both).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError
from ..ops import adaround_init_v, adaround_quantize, fake_quantize
from .quantizer import Quantizer, QuantSpec


class _QuantLayer(nn.Module):
    kind = ""

    def _init_quant(self, weight: torch.Tensor, bias: torch.Tensor | None, w_spec: QuantSpec, a_spec: QuantSpec,
                    int32_bias: bool):
        self.int32_bias = int32_bias
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.weight_quantizer = Quantizer(w_spec, weight.shape[0])
        self.input_quantizer = Quantizer(a_spec, 1)
        # True when the input arrives on the grid already (a site's output, see sites.py): input_quantizer
        # is then that site's quantizer, used for the bias grid s_x s_w but not applied again
        self.input_prequantized = False
        self.rounding = "nearest"
        self.v: nn.Parameter | None = None   # AdaRound's continuous rounding variable
        self.beta = 2.0
        self.reg = None                       # last rounding regularizer (soft rounding only)

    # ---------------------------------------------------------------- weights
    def _wq_args(self):
        q = self.weight_quantizer
        sp = q.spec
        return q.effective_scale(), (None if sp.symmetric else q.zero_point), sp

    def init_adaround(self) -> nn.Parameter:
        """Start soft rounding at V0 with h(V0) = frac(w/s), i.e. at the float weight."""
        s, _, _ = self._wq_args()
        self.v = nn.Parameter(adaround_init_v(self.weight, s, axis=0))
        self.rounding = "soft"
        return self.v

    def weight_hat(self) -> torch.Tensor:
        if self.rounding == "frozen":
            q = self.weight_quantizer
            shape = (-1,) + (1,) * (self.w_int.dim() - 1)
            return (self.w_int.to(q.scale.dtype) - q.zero_point.view(shape)) * q.effective_scale().view(shape)
        s, z, sp = self._wq_args()
        if self.rounding == "nearest":
            return fake_quantize(self.weight, s, z, bits=sp.bits, signed=sp.signed, axis=0)
        soft = self.rounding == "soft"
        w_hat, reg = adaround_quantize(self.weight, self.v, s, z, bits=sp.bits, signed=sp.signed, axis=0,
                                       hard=not soft, beta=self.beta, compute_reg=soft)
        self.reg = reg if soft else None
        return w_hat

    # ---------------------------------------------------------------- bias
    def bias_scale(self) -> torch.Tensor:
        """s_x s_w per output channel: the scale of the int32 accumulator (and of an int32 bias)."""
        return self.input_quantizer.effective_scale().reshape(()) * self.weight_quantizer.effective_scale()

    def integer_bias(self) -> torch.Tensor:
        """round(b / (s_x s_w)) saturated to int32, as float (exact for |b / (s_x s_w)| < 2^24)."""
        # the upper bound is the largest float32 below 2^31 (2^31 - 1 rounds up to 2^31, which int32 cannot hold)
        return torch.round(self.bias.detach() / self.bias_scale()).clamp(INT32_MIN, INT32_MAX_F32)

    def bias_hat(self) -> torch.Tensor | None:
        if self.bias is None or not self.int32_bias:
            return self.bias
        # the scales are detached: the bias grid follows LSQ's activation scale but does not train it
        return self.integer_bias() * self.bias_scale()

    def integer_weight(self) -> torch.Tensor:
        """The weight's integers q in [qmin, qmax] under the current rounding."""
        if self.rounding == "frozen":
            return self.w_int.clone()
        s, _, sp = self._wq_args()
        shape = (-1,) + (1,) * (self.weight.dim() - 1)
        z = self.weight_quantizer.zero_point.view(shape) if not sp.symmetric else 0.0
        ws = self.weight / s.view(shape)
        if self.rounding == "nearest":
            q = torch.round(ws) + z
        else:
            q = torch.floor(ws) + (self.v >= 0).to(ws.dtype) + z
        qmin, qmax = sp.qrange
        return q.clamp(qmin, qmax)

    def freeze(self) -> None:
        """Replace the float weight by its integers (int8/uint8 up to 8 bits, int16/int32 above)."""
        if self.rounding == "frozen":
            return
        q = self.integer_weight().detach()
        sp = self.weight_quantizer.spec
        del self.weight
        self.v = None
        self.register_buffer("w_int", q.to(integer_dtype(sp)))
        self.weight_quantizer.set_params(self.weight_quantizer.scale, self.weight_quantizer.zero_point)
        self.rounding = "frozen"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export() and self.rounding == "frozen":
            from .onnx_qdq import dq_weight
            w_hat = dq_weight(self)
        else:
            w_hat = self.weight_hat()
        x_q = x if self.input_prequantized else self.input_quantizer(x)
        return self._op(x_q, w_hat, self._bias_for_forward())

    def _bias_for_forward(self) -> torch.Tensor | None:
        if torch.onnx.is_in_onnx_export() and self.bias is not None and self.int32_bias:
            from .onnx_qdq import dq_bias  # an int32 initializer behind DequantizeLinear
            return dq_bias(self)
        return self.bias_hat()

    def extra_repr(self) -> str:
        return f"{self._shape_repr()}, rounding={self.rounding}{', int32 bias' if self.int32_bias else ''}"


def _own_forward(layer: nn.Module, base: type) -> bool:
    """A Conv2d/Linear whose forward is not the plain op on (weight, bias): a subclass with its own forward
    (efficientnet_pytorch's and timm's "same" padding convs pad first) or a non-zero padding mode."""
    if type(layer).forward is not base.forward:
        return True
    if base is nn.Conv2d:
        return type(layer)._conv_forward is not nn.Conv2d._conv_forward or layer.padding_mode != "zeros"
    return False


def _weightless_copy(layer: nn.Module) -> nn.Module:
    """`layer` without its weight and bias (and hooks), to run its own forward on the quantized weight."""
    extra = [n for n, p in layer.named_parameters(recurse=True) if n not in ("weight", "bias") and p is not None]
    extra += [n for n, b in layer.named_buffers(recurse=True) if b is not None]
    if extra:
        raise UnsupportedModelError(f"a {type(layer).__name__} with its own forward and other tensors "
                                    f"({extra[:4]}) cannot be quantized as one weight on an integer grid")
    memo = {id(p): None for p in layer._parameters.values() if p is not None}  # shared, never copied
    mod = copy.deepcopy(layer, memo)
    mod._parameters = {}
    for hooks in ("_forward_hooks", "_forward_pre_hooks"):
        getattr(mod, hooks).clear()
    return mod


class _OwnForward:
    """Runs a layer's own forward (padding included) with a given weight and bias: its weightless copy is
    held outside the module tree (no parameters, no state-dict entries, moved by nothing)."""

    def __init__(self, layer: nn.Module):
        self.module = _weightless_copy(layer)

    def __call__(self, x, w, b):
        m = self.module
        m.weight, m.bias = w, b  # plain attributes: the copy has no parameters of that name
        try:
            return m(x)
        finally:
            m.weight = m.bias = None


class QuantConv2d(_QuantLayer):
    kind = "conv2d"

    def __init__(self, conv: nn.Conv2d, w_spec: QuantSpec, a_spec: QuantSpec, int32_bias: bool = False):
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.own_forward = _OwnForward(conv) if _own_forward(conv, nn.Conv2d) else None
        self._init_quant(conv.weight, conv.bias, w_spec, a_spec, int32_bias)

    def _op(self, x, w, b):
        if self.own_forward is not None:
            return self.own_forward(x, w, b)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def _shape_repr(self):
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}, groups={self.groups}"


class QuantLinear(_QuantLayer):
    kind = "linear"

    def __init__(self, linear: nn.Linear, w_spec: QuantSpec, a_spec: QuantSpec, int32_bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.own_forward = _OwnForward(linear) if _own_forward(linear, nn.Linear) else None
        self._init_quant(linear.weight, linear.bias, w_spec, a_spec, int32_bias)

    def _op(self, x, w, b):
        if self.own_forward is not None:
            return self.own_forward(x, w, b)
        return F.linear(x, w, b)

    def _shape_repr(self):
        return f"{self.in_features}, {self.out_features}"


QUANT_LAYERS = (QuantConv2d, QuantLinear)
INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1
INT32_MAX_F32 = 2 ** 31 - 128


def integer_dtype(spec: QuantSpec) -> torch.dtype:
    if spec.bits <= 8:
        return torch.int8 if spec.signed else torch.uint8
    return torch.int16 if spec.bits <= 15 or spec.signed else torch.int32


def quant_layer_for(module: nn.Module, w_spec: QuantSpec, a_spec: QuantSpec, int32_bias: bool = False) -> _QuantLayer:
    if isinstance(module, nn.Conv2d):
        return QuantConv2d(module, w_spec, a_spec, int32_bias)
    if isinstance(module, nn.Linear):
        return QuantLinear(module, w_spec, a_spec, int32_bias)
    raise UnsupportedModelError(f"cannot quantize {type(module).__name__}")


class QuantizedModel(nn.Module):
    """The quantized network: `model` (layers swapped, BN folded) followed by the output quantizer.

    `quant_config` (a JSON-serialisable dict) says exactly what is quantized and how. `site_quantizers`
    (hw) quantize module outputs through forward hooks already registered on `model` (sites.attach); they
    are held here, in quant_config["sites"] order, so that they are saved and moved with the model.
    """

    def __init__(self, model: nn.Module, output_quantizer: Quantizer | None, quant_config: dict,
                 site_quantizers: list[Quantizer] | None = None):
        super().__init__()
        self.model = model
        self.output_quantizer = output_quantizer
        self.quant_config = quant_config
        self.site_quantizers = nn.ModuleList(site_quantizers or [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model(x)
        return y if self.output_quantizer is None else self.output_quantizer(y)

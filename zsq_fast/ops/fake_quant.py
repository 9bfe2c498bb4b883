"""Fake quantization with a straight-through gradient for x and the LSQ gradient for the scale (op 2).

torch.ops.zsq_fast.fake_quant is the registered operator (kernel per device, fake kernel and autograd
below); `fake_quant` / `fake_quantize` are its checked Python faces.
"""
from __future__ import annotations

import torch

from ..errors import InvalidArgumentError
from ._backend import _C  # noqa: F401  (loads and registers the operators)
from ._fakes import dense_like
from .checks import check_bits, check_float, check_scale, check_zero_point, normalize_axis, quant_range
from .checks import validate_scale, value_checks_enabled

_op = torch.ops.zsq_fast.fake_quant
_backward_op = torch.ops.zsq_fast.fake_quant_backward


@torch.library.register_fake("zsq_fast::fake_quant")
def _(x, scale, zero_point, qmin, qmax, axis):
    return dense_like(x)


@torch.library.register_fake("zsq_fast::fake_quant_backward")
def _(grad, x, scale, zero_point, qmin, qmax, axis, need_scale_grad):
    return dense_like(x), (torch.empty_like(scale) if need_scale_grad else scale.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, scale, zero_point, qmin, qmax, axis = inputs
    ctx.save_for_backward(x, scale, zero_point)
    ctx.args = (qmin, qmax, axis)


def _backward(ctx, grad):
    x, scale, zero_point = ctx.saved_tensors
    qmin, qmax, axis = ctx.args
    need_s = ctx.needs_input_grad[1]
    gx, gs = _backward_op(grad, x, scale, zero_point, qmin, qmax, axis, need_s)
    return gx, (gs if need_s else None), None, None, None, None


torch.library.register_autograd("zsq_fast::fake_quant", _backward, setup_context=_setup_context)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
               qmin: int, qmax: int, axis: int | None = None) -> torch.Tensor:
    """x_hat = s (clamp(round(x/s) + z, qmin, qmax) - z) on an explicit integer range."""
    check_float(x, "x")
    axis = normalize_axis(axis, x.dim())
    if not isinstance(qmin, int) or not isinstance(qmax, int) or qmin >= qmax:
        raise InvalidArgumentError(f"need integers qmin < qmax, got [{qmin}, {qmax}]")
    scale = check_scale(scale, x, axis)
    zp = check_zero_point(zero_point, scale, qmin, qmax)
    return _op(x, scale, zp, qmin, qmax, -1 if axis is None else axis)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None, *,
                  bits: int = 8, signed: bool = True, axis: int | None = None,
                  power_of_two: bool = False) -> torch.Tensor:
    """Fake-quantize x to a `bits`-bit grid, per tensor (axis=None) or per channel along `axis`.

    Symmetric when zero_point is None; `power_of_two` rounds the scale to 2^round(log2 s)
    (gradient passed straight through to s).
    """
    check_bits(bits)
    qmin, qmax = quant_range(bits, signed)
    if power_of_two:
        check_float(scale, "scale")
        scale = round_pow2(scale)
    return fake_quant(x, scale, zero_point, qmin, qmax, axis)


def round_pow2(scale: torch.Tensor) -> torch.Tensor:
    """Nearest power of two (in log2), straight-through gradient. Written p + (s - s.detach()) so the
    value is exactly p (s - s is exactly 0) while d/ds = 1."""
    if value_checks_enabled():
        validate_scale(scale)
    s = scale.detach()
    return torch.exp2(torch.round(torch.log2(s))) + (scale - s)

"""Fake quantization with a straight-through gradient for x and the LSQ gradient for the scale (op 2)."""
from __future__ import annotations

import torch

from . import reference as ref
from ._backend import _C, use_kernel
from .checks import check_bits, check_float, check_scale, check_zero_point, normalize_axis, quant_range


class _FakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis):
        ctx.save_for_backward(x, scale, zero_point)
        ctx.args = (qmin, qmax, axis)
        if use_kernel(x):
            return _C.fake_quant_forward(x, scale, zero_point, qmin, qmax, -1 if axis is None else axis)
        return ref.fake_quant_forward(x, scale, zero_point, qmin, qmax, axis)

    @staticmethod
    def backward(ctx, grad):
        x, scale, zero_point = ctx.saved_tensors
        qmin, qmax, axis = ctx.args
        need_s = ctx.needs_input_grad[1]
        if use_kernel(x):
            gx, gs = _C.fake_quant_backward(grad.contiguous(memory_format=_format_of(x)), x, scale, zero_point,
                                            qmin, qmax, -1 if axis is None else axis, need_s)
            gs = gs if need_s else None
        else:
            gx, gs = ref.fake_quant_backward(grad, x, scale, zero_point, qmin, qmax, axis, need_s)
        return gx, gs, None, None, None, None


def _format_of(x: torch.Tensor):
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
               qmin: int, qmax: int, axis: int | None = None) -> torch.Tensor:
    """x_hat = s (clamp(round(x/s) + z, qmin, qmax) - z) on an explicit integer range."""
    check_float(x, "x")
    axis = normalize_axis(axis, x.dim())
    if not isinstance(qmin, int) or not isinstance(qmax, int) or qmin >= qmax:
        raise ValueError(f"need integers qmin < qmax, got [{qmin}, {qmax}]")
    scale = check_scale(scale, x, axis)
    zp = check_zero_point(zero_point, scale, qmin, qmax)
    return _FakeQuant.apply(x, scale, zp, qmin, qmax, axis)


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


class _RoundPow2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s):
        return torch.exp2(torch.round(torch.log2(s)))

    @staticmethod
    def backward(ctx, g):
        return g


def round_pow2(scale: torch.Tensor) -> torch.Tensor:
    """Nearest power of two (in log2), straight-through gradient."""
    if scale.numel() and not bool(torch.all(scale > 0)):
        raise ValueError("scale must be > 0 everywhere to round it to a power of two")
    return _RoundPow2.apply(scale)

"""AdaRound soft quantization with its rounding regularizer, fused (op 3).

w_hat = s (clamp(floor(w/s) + h(V) + z, qmin, qmax) - z), h(V) = clamp(sigmoid(V)(zeta-gamma)+gamma, 0, 1),
reg = sum(1 - |2h(V) - 1|^beta). One kernel pass gives both; one backward pass gives dL/dV from both.
"""
from __future__ import annotations

import torch

from . import reference as ref
from ._backend import _C, use_kernel
from .checks import check_bits, check_float, check_scale, check_zero_point, normalize_axis, quant_range

ZETA, GAMMA = ref.ZETA, ref.GAMMA


class _AdaRound(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, v, scale, zero_point, qmin, qmax, axis, hard, beta, compute_reg):
        ctx.save_for_backward(w, v, scale, zero_point)
        ctx.args = (qmin, qmax, axis, beta)
        ctx.hard = hard
        if use_kernel(w):
            w_hat, reg = _C.adaround_forward(w, v, scale, zero_point, qmin, qmax,
                                             -1 if axis is None else axis, hard, float(beta), compute_reg)
        else:
            w_hat, reg = ref.adaround_forward(w, v, scale, zero_point, qmin, qmax, axis, hard, beta, compute_reg)
        return w_hat, reg

    @staticmethod
    def backward(ctx, g_w_hat, g_reg):
        w, v, scale, zero_point = ctx.saved_tensors
        if ctx.hard:  # hard rounding is a step function of V
            return (None,) * 10
        qmin, qmax, axis, beta = ctx.args
        if g_w_hat is None:
            g_w_hat = torch.zeros_like(w)
        if g_reg is None:
            g_reg = torch.zeros((), device=w.device)
        g_reg = g_reg.reshape(()).to(ref.compute_dtype(w.dtype))
        if use_kernel(w):
            gv = _C.adaround_backward(g_w_hat.contiguous(), g_reg, w, v, scale, zero_point, qmin, qmax,
                                      -1 if axis is None else axis, float(beta))
        else:
            gv = ref.adaround_backward(g_w_hat, g_reg, w, v, scale, zero_point, qmin, qmax, axis, beta)
        return None, gv, None, None, None, None, None, None, None, None


def _prepare(w, v, scale, zero_point, bits, signed, axis):
    check_float(w, "w")
    check_float(v, "v")
    if v.shape != w.shape:
        raise ValueError(f"v must have w's shape {tuple(w.shape)}, got {tuple(v.shape)}")
    if v.dtype != w.dtype:
        raise TypeError(f"v must have w's dtype {w.dtype}, got {v.dtype}")
    check_bits(bits)
    qmin, qmax = quant_range(bits, signed)
    axis = normalize_axis(axis, w.dim())
    scale = check_scale(scale, w, axis)
    zp = check_zero_point(zero_point, scale, qmin, qmax)
    return scale, zp, qmin, qmax, axis


def adaround_quantize(w: torch.Tensor, v: torch.Tensor, scale: torch.Tensor,
                      zero_point: torch.Tensor | None = None, *, bits: int, signed: bool = True,
                      axis: int | None = 0, hard: bool = False, beta: float = 2.0,
                      compute_reg: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_hat, reg): soft (or hard, h = 1[V >= 0]) AdaRound weights and the rounding regularizer.

    Differentiable w.r.t. v only (w and the scales are fixed during reconstruction). beta >= 1.
    """
    scale, zp, qmin, qmax, axis = _prepare(w, v, scale, zero_point, bits, signed, axis)
    if beta < 1:
        raise ValueError(f"beta must be >= 1 (the regularizer's gradient diverges below), got {beta}")
    return _AdaRound.apply(w.detach(), v, scale, zp, qmin, qmax, axis, bool(hard), float(beta), bool(compute_reg))


def adaround_init_v(w: torch.Tensor, scale: torch.Tensor, axis: int | None = 0) -> torch.Tensor:
    """V0 such that h(V0) reproduces frac(w/s), so soft AdaRound starts at w itself (up to clipping)."""
    check_float(w, "w")
    axis = normalize_axis(axis, w.dim())
    scale = check_scale(scale, w, axis)
    return ref.adaround_init_v(w, scale, axis).to(w.dtype)


rectified_sigmoid = ref.rectified_sigmoid

"""AdaRound soft quantization with its rounding regularizer, fused (op 3).

w_hat = s (clamp(floor(w/s) + h(V) + z, qmin, qmax) - z), h(V) = clamp(sigmoid(V)(zeta-gamma)+gamma, 0, 1),
reg = sum(1 - |2h(V) - 1|^beta). One kernel pass gives both; one backward pass gives dL/dV from both.
torch.ops.zsq_fast.adaround is the registered operator (fake kernel and autograd below).
"""
from __future__ import annotations

import torch

from ..errors import InvalidArgumentError, InvalidTypeError
from . import reference as ref
from ._backend import _C  # noqa: F401  (loads and registers the operators)
from ._fakes import dense_like
from .checks import check_bits, check_float, check_scale, check_zero_point, normalize_axis, quant_range

ZETA, GAMMA = ref.ZETA, ref.GAMMA

_op = torch.ops.zsq_fast.adaround
_backward_op = torch.ops.zsq_fast.adaround_backward


@torch.library.register_fake("zsq_fast::adaround")
def _(w, v, scale, zero_point, qmin, qmax, axis, hard, beta, compute_reg):
    return dense_like(w), w.new_empty((), dtype=ref.compute_dtype(w.dtype))


@torch.library.register_fake("zsq_fast::adaround_backward")
def _(grad_w_hat, grad_reg, w, v, scale, zero_point, qmin, qmax, axis, beta):
    return dense_like(w, v.dtype)


def _setup_context(ctx, inputs, output):
    w, v, scale, zero_point, qmin, qmax, axis, hard, beta, compute_reg = inputs
    ctx.save_for_backward(w, v, scale, zero_point)
    ctx.args = (qmin, qmax, axis, beta)
    ctx.hard = hard


def _backward(ctx, g_w_hat, g_reg):
    if ctx.hard:  # hard rounding is a step function of V
        return (None,) * 10
    w, v, scale, zero_point = ctx.saved_tensors
    qmin, qmax, axis, beta = ctx.args
    if g_w_hat is None:
        g_w_hat = torch.zeros_like(w)
    if g_reg is None:
        g_reg = w.new_zeros((), dtype=ref.compute_dtype(w.dtype))
    gv = _backward_op(g_w_hat.to(w.dtype), g_reg, w, v, scale, zero_point, qmin, qmax, axis, beta)
    return None, gv, None, None, None, None, None, None, None, None


torch.library.register_autograd("zsq_fast::adaround", _backward, setup_context=_setup_context)


def _prepare(w, v, scale, zero_point, bits, signed, axis):
    check_float(w, "w")
    check_float(v, "v")
    if v.shape != w.shape:
        raise InvalidArgumentError(f"v must have w's shape {tuple(w.shape)}, got {tuple(v.shape)}")
    if v.dtype != w.dtype:
        raise InvalidTypeError(f"v must have w's dtype {w.dtype}, got {v.dtype}")
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
        raise InvalidArgumentError(f"beta must be >= 1 (the regularizer's gradient diverges below), got {beta}")
    return _op(w.detach(), v, scale.detach(), zp, qmin, qmax, -1 if axis is None else axis, bool(hard),
               float(beta), bool(compute_reg))


def adaround_init_v(w: torch.Tensor, scale: torch.Tensor, axis: int | None = 0) -> torch.Tensor:
    """V0 such that h(V0) reproduces frac(w/s), so soft AdaRound starts at w itself (up to clipping)."""
    check_float(w, "w")
    axis = normalize_axis(axis, w.dim())
    scale = check_scale(scale, w, axis)
    return ref.adaround_init_v(w, scale, axis).to(w.dtype)


rectified_sigmoid = ref.rectified_sigmoid

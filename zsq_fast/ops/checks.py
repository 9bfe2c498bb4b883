"""Argument checks shared by the ops: clear ValueError/TypeError instead of deep stack traces.

Per-call checks look at types, shapes and dtypes only. Checks that read a tensor's *values* (scale > 0,
integer zero points) would synchronize with the GPU on every call and break CUDA-graph capture, so
they run once where quantizers are set up (`validate_scale`, `validate_zero_point`), and on every call
only when value checks are switched on (`set_value_checks(True)` or ZSQ_FAST_CHECK_VALUES=1: a debug aid).
"""
from __future__ import annotations

import contextlib
import os

import torch

from ..errors import InvalidArgumentError, InvalidTypeError
MIN_BITS, MAX_BITS = 2, 16
_VALUE_CHECKS = os.environ.get("ZSQ_FAST_CHECK_VALUES", "0") not in ("", "0", "false", "False")


def value_checks_enabled() -> bool:
    return _VALUE_CHECKS


def set_value_checks(enabled: bool) -> bool:
    """Switch the per-call value checks on or off; returns the previous setting."""
    global _VALUE_CHECKS
    previous, _VALUE_CHECKS = _VALUE_CHECKS, bool(enabled)
    return previous


@contextlib.contextmanager
def value_checks(enabled: bool = True):
    previous = set_value_checks(enabled)
    try:
        yield
    finally:
        set_value_checks(previous)


def check_float(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise InvalidTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise InvalidTypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise InvalidTypeError(f"bits must be an int, got {bits!r}")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise InvalidArgumentError(f"bits must be between {MIN_BITS} and {MAX_BITS}, got {bits}")
    return bits


def quant_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of a `bits`-bit grid: [-2^(b-1), 2^(b-1)-1] signed, [0, 2^b-1] unsigned."""
    check_bits(bits)
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def normalize_axis(axis, ndim: int) -> int | None:
    if axis is None:
        return None
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise InvalidTypeError(f"axis must be an int or None, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise InvalidArgumentError(f"axis {axis} is out of range for a tensor with {ndim} dims")
    return axis % ndim


def validate_scale(scale: torch.Tensor, name: str = "scale") -> None:
    """Every element finite and > 0 (reads the values: call at setup, not per step)."""
    if scale.numel() and not bool(torch.all(torch.isfinite(scale) & (scale > 0))):
        raise InvalidArgumentError(f"{name} must be finite and > 0 everywhere (got min {float(scale.min())}, "
                         f"max {float(scale.max())})")


def validate_zero_point(zp: torch.Tensor, qmin: int, qmax: int, name: str = "zero_point") -> None:
    """Integers within [qmin, qmax] (reads the values: call at setup, not per step)."""
    if zp.numel() and not bool(torch.all((zp == zp.round()) & (zp >= qmin) & (zp <= qmax))):
        raise InvalidArgumentError(f"{name} must hold integers within [{qmin}, {qmax}]")


def check_scale(scale: torch.Tensor, x: torch.Tensor, axis: int | None, name: str = "scale") -> torch.Tensor:
    """A per-tensor (numel 1) or per-channel (numel = x.shape[axis]) scale, as a flat vector."""
    check_float(scale, name)
    expected = 1 if axis is None else x.shape[axis]
    if scale.numel() != expected:
        where = "per-tensor" if axis is None else f"per-channel along axis {axis}"
        raise InvalidArgumentError(f"{name} has {scale.numel()} elements; {where} needs {expected}")
    if _VALUE_CHECKS:
        validate_scale(scale, name)
    return scale.reshape(-1)


def check_zero_point(zero_point, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    if zero_point is None:
        return torch.zeros_like(scale, dtype=torch.float32)
    if not isinstance(zero_point, torch.Tensor):
        zero_point = torch.tensor(float(zero_point), device=scale.device)
    zp = zero_point.reshape(-1).to(torch.float32)
    if zp.numel() == 1 and scale.numel() != 1:
        zp = zp.expand(scale.numel()).contiguous()
    if zp.numel() != scale.numel():
        raise InvalidArgumentError(f"zero_point has {zp.numel()} elements, scale has {scale.numel()}")
    if _VALUE_CHECKS:
        validate_zero_point(zp, qmin, qmax)
    return zp

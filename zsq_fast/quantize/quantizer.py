"""Uniform affine quantizer: x_hat = s (clamp(round(x/s) + z, qmin, qmax) - z).

One module per tensor that is quantized (a layer's weight, a layer's input, the network output).
Its state is the scale s (an nn.Parameter, so LSQ can learn it), the zero point z (a buffer) and a
QuantSpec saying which integer grid is used.

Learning the scale (LSQ, Esser et al. 2020) during reconstruction: start_learning() returns the tensor to
optimise. A free scale is learned as s itself. A power-of-two scale is learned as t = log2 s, used as
s = 2^round(t) with a straight-through round: the value is always an exact power of two, while t moves
smoothly, so many small steps add up to a change of the exponent (with s itself, a step smaller than
the gap to the next rounding boundary is lost at every use and the exponent rarely changes).
stop_learning() stores s = 2^round(t).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..ops import fake_quantize, quant_range


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    signed: bool = True        # integer grid: [-2^(b-1), 2^(b-1)-1] if signed, else [0, 2^b-1]
    symmetric: bool = True     # z = 0; asymmetric grids carry an integer zero point
    axis: int | None = None    # per-channel along this axis; None = one scale per tensor
    pow2: bool = False         # scales restricted to powers of two (hardware shifts)

    @property
    def qrange(self) -> tuple[int, int]:
        return quant_range(self.bits, self.signed)

    def to_dict(self) -> dict:
        return asdict(self)


def qdrop_mask(x: torch.Tensor, p: float, rows: tuple[int, torch.Tensor] | None = None) -> torch.Tensor:
    """QDrop's keep-float mask for x (B, ...): each element True with probability p. rows = (global batch
    size, positions of x's rows in it): the mask is drawn for the whole global batch and x's rows taken, so
    ranks holding parts of one batch draw what a single process draws for all of it (same seed)."""
    if rows is None:
        return torch.rand_like(x) < p
    n, pos = rows
    return torch.rand((n, *x.shape[1:]), dtype=x.dtype, device=x.device)[pos.to(x.device)] < p


def qdrop_mix(keep_float: torch.Tensor, x_float: torch.Tensor, x_quant: torch.Tensor) -> torch.Tensor:
    """torch.where(keep_float, x_float, x_quant), written as arithmetic: the same values up to one rounding
    and the same gradients (mask, 1 - mask), at a third of where's time on CPU (measured, 2-core EPYC)."""
    return x_quant + keep_float * (x_float - x_quant)


def _view_of(x: torch.Tensor, out: torch.Tensor, version: int) -> bool:
    """x holds exactly out's values as made: the same storage, offset and size, and no in-place change since
    (views share one version counter; the memo keeps out alive, so its storage cannot have been reused)."""
    return (x.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()
            and x.storage_offset() == out.storage_offset() and x.numel() == out.numel()
            and x._version == version and x.is_contiguous() and out.is_contiguous())


class Quantizer(nn.Module):
    """Fake-quantizes its input with (scale, zero_point); QDrop keeps each element float with prob drop_prob."""

    def __init__(self, spec: QuantSpec, channels: int = 1):
        super().__init__()
        self.spec = spec
        self.scale = nn.Parameter(torch.ones(channels), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(channels))
        self.enabled = True
        self.drop_prob = 0.0
        self.log2_scale: torch.Tensor | None = None  # the learned exponent while LSQ runs (pow2 grids)
        self.drop_rows: tuple[int, torch.Tensor] | None = None  # QDrop's rows of the global batch (qdrop_mask)
        # QDrop's (input, output) pairs of this reconstruction step (a list the loop renews every step; None
        # outside it): one tensor is dropped once however many of its readers apply this quantizer
        self.drop_memo: list[tuple[torch.Tensor, int, torch.Tensor, int]] | None = None  # (x, version, x_hat, version)

    def set_params(self, scale: torch.Tensor, zero_point: torch.Tensor | None = None) -> None:
        """Set the scale and zero point. Their values are not read per step by the ops (that would sync a GPU):
        calibration keeps scales >= 1e-8, and quantize/save/load check every scale of the result once."""
        scale = scale.detach().reshape(-1).to(self.scale)
        if self.spec.pow2:
            scale = torch.exp2(torch.round(torch.log2(scale)))
        self.scale.data = scale.clone()
        zp = torch.zeros_like(scale) if zero_point is None else zero_point.detach().reshape(-1).to(scale)
        self.zero_point = zp.clone()

    def effective_scale(self) -> torch.Tensor:
        if self.log2_scale is not None:
            return torch.exp2(torch.round(self.log2_scale.detach()))
        s = self.scale.detach()
        return torch.exp2(torch.round(torch.log2(s))) if self.spec.pow2 else s

    # ---------------------------------------------------------------- LSQ
    def start_learning(self) -> torch.Tensor:
        """The tensor LSQ optimises: log2 s for power-of-two grids, s otherwise (see the module docstring)."""
        if self.spec.pow2:
            self.log2_scale = torch.round(torch.log2(self.scale.detach())).clone().requires_grad_(True)
            return self.log2_scale
        self.scale.requires_grad_(True)
        return self.scale

    def learning_rate(self, relative_step: float) -> float:
        """Adam lr for start_learning()'s tensor so that one step changes s by about relative_step * s
        (Adam's steps are about lr in size whatever the gradient's scale: the same act_lr works at any
        bit width and scale magnitude). For t = log2 s that is relative_step / ln 2."""
        if self.spec.pow2:
            return relative_step / math.log(2.0)
        return relative_step * float(self.scale.detach().mean())

    def stop_learning(self) -> None:
        if self.log2_scale is not None:
            self.scale.data = torch.exp2(torch.round(self.log2_scale.detach())).to(self.scale)
            self.log2_scale = None
        else:
            self.scale.data.clamp_(min=torch.finfo(self.scale.dtype).tiny)
        self.scale.requires_grad_(False)

    def _scale_for_forward(self) -> torch.Tensor:
        t = self.log2_scale
        if t is None:
            return self.scale
        return torch.exp2(t + (torch.round(t) - t).detach())  # exactly 2^round(t); d/dt = s ln 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if torch.onnx.is_in_onnx_export():
            from .onnx_qdq import qdq_activation  # the ONNX graph gets QuantizeLinear/DequantizeLinear
            return qdq_activation(x, self)
        if self.drop_prob > 0 and self.drop_memo is not None:
            for src, src_version, out, out_version in self.drop_memo:
                # a second reader of the tensor (a quantizer shared by two layers), both unchanged: one mask
                if x is src and x._version == src_version and out._version == out_version:
                    return out
                if _view_of(x, out, out_version):  # a reader of a view of this step's output (torch.flatten)
                    return x
        sp = self.spec
        x_hat = fake_quantize(x, self._scale_for_forward(), None if sp.symmetric else self.zero_point, bits=sp.bits,
                              signed=sp.signed, axis=sp.axis, power_of_two=sp.pow2)
        if self.drop_prob > 0:  # QDrop (Wei et al. 2022): element-wise, keep the float value with prob p
            x_hat = qdrop_mix(qdrop_mask(x, self.drop_prob, self.drop_rows), x, x_hat)
            if self.drop_memo is not None:
                self.drop_memo.append((x, x._version, x_hat, x_hat._version))
        return x_hat

    def extra_repr(self) -> str:
        sp = self.spec
        kind = "symmetric" if sp.symmetric else "asymmetric"
        where = "per-tensor" if sp.axis is None else f"per-channel(axis={sp.axis})"
        return f"{sp.bits}-bit {'signed' if sp.signed else 'unsigned'} {kind} {where}{' pow2' if sp.pow2 else ''}"

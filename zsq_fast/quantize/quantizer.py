"""Uniform affine quantizer: x_hat = s (clamp(round(x/s) + z, qmin, qmax) - z).

One module per tensor that is quantized (a layer's weight, a layer's input, the network output).
Its state is the scale s (an nn.Parameter, so LSQ can learn it), the zero point z (a buffer) and a
QuantSpec saying which integer grid is used.
"""
from __future__ import annotations

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


class Quantizer(nn.Module):
    """Fake-quantizes its input with (scale, zero_point); QDrop keeps each element float with prob drop_prob."""

    def __init__(self, spec: QuantSpec, channels: int = 1):
        super().__init__()
        self.spec = spec
        self.scale = nn.Parameter(torch.ones(channels), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(channels))
        self.enabled = True
        self.drop_prob = 0.0

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
        s = self.scale.detach()
        return torch.exp2(torch.round(torch.log2(s))) if self.spec.pow2 else s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if torch.onnx.is_in_onnx_export():
            from .onnx_qdq import qdq_activation  # the ONNX graph gets QuantizeLinear/DequantizeLinear
            return qdq_activation(x, self)
        sp = self.spec
        x_hat = fake_quantize(x, self.scale, None if sp.symmetric else self.zero_point, bits=sp.bits,
                              signed=sp.signed, axis=sp.axis, power_of_two=sp.pow2)
        if self.drop_prob > 0:  # QDrop (Wei et al. 2022): element-wise, keep the float value with prob p
            x_hat = torch.where(torch.rand_like(x) < self.drop_prob, x, x_hat)
        return x_hat

    def extra_repr(self) -> str:
        sp = self.spec
        kind = "symmetric" if sp.symmetric else "asymmetric"
        where = "per-tensor" if sp.axis is None else f"per-channel(axis={sp.axis})"
        return f"{sp.bits}-bit {'signed' if sp.signed else 'unsigned'} {kind} {where}{' pow2' if sp.pow2 else ''}"

"""The quantization presets and the W{w}A{a} bit-width notation.

hw        as an integer accelerator runs the network: every tensor that passes between ops is on an integer
          grid, quantized once by its producer (sites.py: activation outputs, residual-add operands, block
          outputs, shortcut and pooling outputs, the logits; a conv's activation fused into it), one quantizer
          per tensor whoever reads it; the network input on an 8-bit grid (images are 8-bit; `input_bits`
          changes it); every layer (first conv and last linear included) at the target bits, symmetric
          per-channel weights, symmetric per-tensor activations (unsigned where the calibration data is
          non-negative, e.g. after ReLU), power-of-two scales, and each layer's bias on its int32
          accumulator grid s_x s_w (layers of <= 8 bits): the fake-quant model computes what an integer
          kernel (and onnxruntime running the ONNX export) computes. The logits' scale keeps each image's
          top-1 (output.py); a BatchNorm that cannot be folded is a quantized depthwise 1x1 conv (fold.py).
          Before issue 12, hw quantized layer
          inputs and the logits only (identity shortcuts added float tensors) and the image at the target
          bits; results measured then are labelled so in benchmarks/RESULTS.md.
int       what onnxruntime, TFLite and TensorRT execute from an int8 QDQ graph: hw's integer grids at hw's places
          (the same sites, the image on an 8-bit grid, the logits quantized, the int32 bias on the accumulator
          grid s_x s_w), but real-valued scales (no power-of-two restriction): symmetric per-channel weights
          (z = 0), asymmetric per-tensor activations with an integer zero point (unsigned [0, 2^b - 1] as
          onnxruntime's uint8; the same grid as TFLite's int8 with z - 2^(b-1)). A requantization is then a
          real multiplier, which onnxruntime applies to the int32 accumulator in float32 and the fake-quant
          model to its float32 conv output: the two round differently only where a value lies within float32
          error of a rounding boundary (one step, rarely; tests/test_preset_int.py measures it), whereas hw's
          power-of-two scales make every value exact. The logits' scale keeps each image's top-1 as under hw
          (output.py), searched over the free-scale asymmetric clippings.
academic  first and last layer at 8 bits (weights and their input), asymmetric per-channel weights,
          asymmetric per-tensor activations, free (real-valued) scales, network output left float.
dgh_paper the setting of the DGH paper's tables (BRECQ's semantics), so results can be set beside the paper's:
          every layer, first and last included, at the target bits; asymmetric per-channel weights with free
          scales; asymmetric per-tensor activations (each layer's input) with free scales; residual-block
          outputs quantized (one quantizer per block output, which the next layers read); the image float;
          the network output quantized; float bias.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InvalidArgumentError, InvalidTypeError
from ..ops.checks import MAX_BITS, MIN_BITS
from .quantizer import QuantSpec

_BITS = re.compile(r"^W(\d+)A(\d+)$", re.IGNORECASE)


def parse_bits(bits: str) -> tuple[int, int]:
    """'W4A4' -> (4, 4). Each width must be within [2, 16]."""
    form = f"expected the form 'W{{w}}A{{a}}' with {MIN_BITS} <= w, a <= {MAX_BITS}, e.g. 'W4A4', 'W3A8'"
    if not isinstance(bits, str):
        raise InvalidTypeError(f"bits must be a string ({form}), got {type(bits).__name__}")
    m = _BITS.match(bits.strip())
    if m is None:
        raise InvalidArgumentError(f"bad bits {bits!r}: {form}")
    w, a = int(m.group(1)), int(m.group(2))
    if not (MIN_BITS <= w <= MAX_BITS and MIN_BITS <= a <= MAX_BITS):
        raise InvalidArgumentError(f"bad bits {bits!r}: {form}")
    return w, a


@dataclass(frozen=True)
class Preset:
    name: str
    first_last_bits: int | None   # None: first/last layers use the target bits
    weight_symmetric: bool
    act_symmetric: bool
    pow2: bool
    quantize_output: bool
    int32_bias: bool = False      # bias rounded to the int32 accumulator grid s_x s_w (integer kernels)
    sites: str = "none"           # module outputs quantized (sites.py): "all" tensors between ops, "blocks"
                                  # (residual-block outputs only) or "none" (layer inputs only)
    input_bits: int | None = None   # the network input's grid (None: the first layer's activation bits)
    float_input: bool = False     # the image stays float (the layers reading it do not quantize it)

    def weight_spec(self, bits: int) -> QuantSpec:
        # symmetric -> signed grid, z = 0; asymmetric -> unsigned grid with a zero point per channel
        return QuantSpec(bits, signed=self.weight_symmetric, symmetric=self.weight_symmetric, axis=0, pow2=self.pow2)

    def act_spec(self, bits: int, nonnegative: bool) -> QuantSpec:
        if self.act_symmetric:  # unsigned grid for non-negative inputs (after ReLU), signed otherwise
            return QuantSpec(bits, signed=not nonnegative, symmetric=True, axis=None, pow2=self.pow2)
        return QuantSpec(bits, signed=False, symmetric=False, axis=None, pow2=self.pow2)


PRESETS = {
    "hw": Preset("hw", None, weight_symmetric=True, act_symmetric=True, pow2=True, quantize_output=True,
                 int32_bias=True, sites="all", input_bits=8),
    # hw's grids with free scales and activation zero points (the int8 QDQ semantics of onnxruntime / TFLite)
    "int": Preset("int", None, weight_symmetric=True, act_symmetric=False, pow2=False, quantize_output=True,
                  int32_bias=True, sites="all", input_bits=8),
    "academic": Preset("academic", 8, weight_symmetric=False, act_symmetric=False, pow2=False,
                       quantize_output=False),
    "dgh_paper": Preset("dgh_paper", None, weight_symmetric=False, act_symmetric=False, pow2=False,
                        quantize_output=True, sites="blocks", float_input=True),
}


def get_preset(name: str) -> Preset:
    if not isinstance(name, str) or name not in PRESETS:
        raise InvalidArgumentError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]

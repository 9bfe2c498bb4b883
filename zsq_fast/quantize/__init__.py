"""Post-training quantization: BN folding, fake-quant layers, calibration, AdaRound/BRECQ, export.

    qmodel = quantize(model, calib_images, bits="W4A4", preset="hw", method="brecq")
    save_quantized(qmodel, "q.pt"); qmodel2 = load_quantized("q.pt", float_model)
    export_onnx(qmodel, "q.onnx", example_input)
"""
from .api import METHODS, quantize
from .export import export_onnx, load_quantized, save_quantized
from .modules import QuantConv2d, QuantizedModel, QuantLinear
from .presets import PRESETS, parse_bits
from .quantizer import Quantizer, QuantSpec

__all__ = ["quantize", "save_quantized", "load_quantized", "export_onnx", "METHODS", "PRESETS", "parse_bits",
           "QuantizedModel", "QuantConv2d", "QuantLinear", "Quantizer", "QuantSpec"]


class _CallableModule(__import__("types").ModuleType):
    """`zsq_fast.quantize` is both this package and the function: importing the package makes it the
    attribute of zsq_fast, so the package itself forwards calls to quantize()."""

    def __call__(self, *args, **kwargs):
        return quantize(*args, **kwargs)


__import__("sys").modules[__name__].__class__ = _CallableModule
__signature__ = __import__("inspect").signature(quantize)  # inspect.signature(zsq_fast.quantize) either way

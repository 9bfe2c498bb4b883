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

"""zsq_fast: data-free low-bit post-training quantization of CNNs.

model -> generate (synthetic calibration images) -> quantize (fake-quant model) -> export / eval.
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import errors, ops  # noqa: E402,F401
from .errors import ZsqFastError  # noqa: E402,F401

# The subpackages zsq_fast.generate and zsq_fast.quantize share their names with the two main
# functions. Importing the functions here, after the subpackages are loaded, makes the package
# attributes the functions; later `import zsq_fast.generate` statements do not rebind them.
from .generate import generate, load_images, save_images  # noqa: E402
from .quantize import export_onnx, load_quantized, quantize, save_quantized  # noqa: E402
from .onnx_eval import evaluate_onnx  # noqa: E402

__all__ = ["ops", "errors", "ZsqFastError", "__version__", "generate", "save_images", "load_images",
           "quantize", "save_quantized", "load_quantized", "export_onnx", "evaluate_onnx"]

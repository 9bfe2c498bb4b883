"""zsq_fast: data-free low-bit post-training quantization of CNNs.

model -> generate (synthetic calibration images) -> quantize (fake-quant model) -> export / eval.
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import ops  # noqa: E402,F401

_LAZY = {
    "generate": ("zsq_fast.generate", "generate"),
    "save_images": ("zsq_fast.generate", "save_images"),
    "load_images": ("zsq_fast.generate", "load_images"),
    "quantize": ("zsq_fast.quantize", "quantize"),
    "save_quantized": ("zsq_fast.quantize", "save_quantized"),
    "load_quantized": ("zsq_fast.quantize", "load_quantized"),
    "export_onnx": ("zsq_fast.quantize", "export_onnx"),
}


def __getattr__(name):  # lazy, so `import zsq_fast` stays light and subpackages stay independent
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'zsq_fast' has no attribute {name!r}")


__all__ = ["ops", "__version__", *_LAZY]

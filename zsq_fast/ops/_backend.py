"""Loads the compiled extension zsq_fast._C (which registers torch.ops.zsq_fast.*), or falls back to
the references for every op, with one warning."""
from __future__ import annotations

import importlib
import warnings

from . import _library

try:  # built by setup.py
    _C = importlib.import_module("zsq_fast._C")
    _IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # not built here, or built against another torch
    _C = None
    _IMPORT_ERROR = exc
    warnings.warn(
        "zsq_fast._C is not built or failed to load "
        f"({type(exc).__name__}: {exc}); every op uses its pure-PyTorch reference. "
        "Build it with `pip install --no-build-isolation --use-pep517 -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )

OPS = ("channel_stats", "fake_quant", "adaround")


def has_cpu_kernels() -> bool:
    return _C is not None


def has_cuda_kernels() -> bool:
    return _C is not None and bool(_C.cuda_compiled())


_library.install(cpu_kernels=has_cpu_kernels(), cuda_kernels=has_cuda_kernels())


def backend() -> dict:
    """Which implementation each op uses on each device: 'kernel' or 'reference'."""
    cpu = "kernel" if has_cpu_kernels() else "reference"
    cuda = "kernel" if has_cuda_kernels() else "reference"
    return {op: {"cpu": cpu, "cuda": cuda} for op in OPS}

"""Shapes and layouts of the kernels' outputs, for the fake (meta) kernels torch.compile traces with."""
from __future__ import annotations

import torch


def is_dense(x: torch.Tensor) -> bool:
    """No gaps and no overlap in memory (contiguous, channels_last, any permutation): what csrc/common.h's
    dense() keeps as is. Dims of size 1 can have any stride."""
    dims = sorted((d for d in range(x.dim()) if x.shape[d] != 1), key=lambda d: x.stride(d))
    expected = 1
    for d in dims:
        if x.stride(d) != expected:
            return False
        expected *= x.shape[d]
    return True


def dense_like(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """What the kernels allocate: x's strides when x is dense, else a contiguous tensor (the kernels
    copy non-dense inputs first)."""
    if x.numel() == 0 or not is_dense(x):
        return torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device)
    return torch.empty_strided(x.shape, x.stride(), dtype=dtype or x.dtype, device=x.device)

"""Adaptive pools the TorchScript ONNX exporter cannot write, rewritten for the export only.

The exporter writes adaptive_avg/max_pool2d only when the output size divides the input size. A torchvision
VGG at a small input (CIFAR's 32 px) pools a 1x1 map to 7x7: each output bin then covers exactly one input
pixel (bin j of a dimension of size i pooled to o = k*i covers [floor(j/k), ceil((j+1)/k)) = {floor(j/k)}),
so the pool is a gather along each such dimension, which exports exactly (Gather of the input's Q/DQ values).
A dimension where neither size divides the other has no exact rewrite: one clear error names the module.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..errors import UnsupportedModelError

_ADAPTIVE = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def _out_size(m: nn.Module, size: tuple[int, int]) -> tuple[int, int]:
    o = m.output_size if isinstance(m.output_size, (tuple, list)) else (m.output_size, m.output_size)
    return tuple(i if k is None else int(k) for k, i in zip(o, size))


def _input_sizes(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[int, int]]:
    """Spatial input size of every adaptive pool on `example` (one forward)."""
    seen: dict[str, tuple[int, int]] = {}
    pools = [(n, m) for n, m in model.named_modules() if isinstance(m, _ADAPTIVE)]
    if not pools:
        return seen  # no forward needed

    def record(name):
        def hook(mod, args):
            seen.setdefault(name, tuple(args[0].shape[-2:]))  # returns None: the input is left alone
        return hook
    handles = [m.register_forward_pre_hook(record(n)) for n, m in pools]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return seen


def _gathering_forward(m: nn.Module, size: tuple[int, int], out: tuple[int, int]):
    """forward of `m` for inputs of `size`: gathers along the dimensions the pool enlarges, then pools the rest
    (now a size the exporter writes)."""
    index = [None if o % i or o == i else torch.arange(o) // (o // i) for i, o in zip(size, out)]
    pool = nn.functional.adaptive_avg_pool2d if isinstance(m, nn.AdaptiveAvgPool2d) else nn.functional.adaptive_max_pool2d

    def forward(x: torch.Tensor) -> torch.Tensor:
        for dim, idx in zip((-2, -1), index):
            if idx is not None:
                x = x.index_select(dim, idx.to(x.device))
        return x if tuple(x.shape[-2:]) == out else pool(x, out)
    return forward


@contextmanager
def exportable_adaptive_pools(model: nn.Module, example: torch.Tensor):
    """Within the block, the adaptive pools the exporter cannot write at `example`'s size compute the same values
    with ops it can write (module docstring); hooks on the modules (hw sites) still apply."""
    patched = []
    try:
        for name, size in _input_sizes(model, example).items():
            m = model.get_submodule(name)
            out = _out_size(m, size)
            if all(i % o == 0 for i, o in zip(size, out)):
                continue  # the exporter writes it
            bad = [(i, o) for i, o in zip(size, out) if i % o and o % i]
            if bad:
                raise UnsupportedModelError(
                    f"ONNX export: {name or 'the model'} ({type(m).__name__}) pools a {size[0]}x{size[1]} map to {out[0]}x{out[1]}; "
                    "the ONNX exporter needs each output size to divide the input size (or be a multiple of it). "
                    "Export with an example_input size where it does (e.g. 224 px for torchvision models)")
            m.forward = _gathering_forward(m, size, out)
            patched.append(m)
        yield
    finally:
        for m in patched:
            del m.forward  # back to the class's forward

"""Fold every BatchNorm into the Conv2d/Linear that feeds it (exact in eval mode).

BN(W x + b) = g (W x + b - mu) / sqrt(var + eps) + beta
            = (W * k) x + (b - mu) k + beta,   k = g / sqrt(var + eps)   (per output channel)
The BN is replaced by nn.Identity. Assumes the layer's output is used only by that BN (true for
conv-BN-act stacks); a BN that does not read a conv/linear output cannot be folded exactly.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModelError


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


@torch.no_grad()
def fold_bn_into(layer: nn.Module, bn: nn.Module) -> None:
    """Fold `bn` into `layer` (Conv2d or Linear) in place."""
    if bn.running_mean is None or bn.running_var is None:
        raise UnsupportedModelError("cannot fold a BatchNorm without running statistics (track_running_stats=False)")
    w = layer.weight
    if w.shape[0] != bn.num_features:
        raise UnsupportedModelError(f"BatchNorm has {bn.num_features} channels but the layer before it has "
                                    f"{w.shape[0]}")
    k = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        k = k * bn.weight.double()
    b = layer.bias.double() if layer.bias is not None else torch.zeros_like(k)
    b = (b - bn.running_mean.double()) * k
    if bn.bias is not None:
        b = b + bn.bias.double()
    w.copy_((w.double() * k.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device), requires_grad=False)
    layer.bias.copy_(b.to(w.dtype))


def fold_bn(model: nn.Module, pairs: list[tuple[str, str]]) -> None:
    """Fold each (layer name, bn name) pair of `model` in place; the BNs become nn.Identity."""
    seen = set()
    for layer_name, bn_name in pairs:
        if layer_name in seen:
            raise UnsupportedModelError(f"{layer_name} feeds more than one BatchNorm; it cannot be folded exactly")
        seen.add(layer_name)
        fold_bn_into(get_module(model, layer_name), get_module(model, bn_name))
        set_module(model, bn_name, nn.Identity())

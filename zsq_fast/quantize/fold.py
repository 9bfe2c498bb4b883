"""Fold every BatchNorm into the Conv2d/Linear that feeds it (exact in eval mode).

BN(W x + b) = g (W x + b - mu) / sqrt(var + eps) + beta
            = (W * k) x + (b - mu) k + beta,   k = g / sqrt(var + eps)   (per output channel)
The BN is replaced by nn.Identity. Assumes the layer's output is used only by that BN (true for
conv-BN-act stacks).

A BN that does not read a conv/linear output (BN -> ReLU -> Conv in DenseNet and pre-activation ResNets)
cannot be folded exactly: it is a per-channel affine op y = k x + (beta - mu k), which an integer
accelerator runs as a depthwise 1x1 convolution. bn_as_conv makes it one, so it is quantized as any conv
(per-channel weight k, the input on its grid, the bias on the int32 accumulator grid under hw) and
exported as an ONNX Conv between QuantizeLinear/DequantizeLinear.
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


@torch.no_grad()
def bn_as_conv(bn: nn.Module) -> nn.Conv2d:
    """The eval-mode BatchNorm2d `bn` as the depthwise 1x1 Conv2d computing the same per-channel affine map."""
    if not isinstance(bn, nn.BatchNorm2d):
        raise UnsupportedModelError(f"a {type(bn).__name__} not fed directly by a Conv2d/Linear cannot be folded, and "
                                    f"only BatchNorm2d becomes a quantized per-channel affine op")
    if bn.running_mean is None or bn.running_var is None:
        raise UnsupportedModelError("cannot quantize a BatchNorm without running statistics (track_running_stats=False)")
    c = bn.num_features
    w = bn.running_mean.new_empty(0)  # dtype/device of the BN
    conv = nn.Conv2d(c, c, 1, groups=c, bias=True).to(device=w.device, dtype=bn.running_mean.dtype)
    k = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        k = k * bn.weight.double()
    b = -bn.running_mean.double() * k
    if bn.bias is not None:
        b = b + bn.bias.double()
    conv.weight.copy_(k.view(c, 1, 1, 1).to(conv.weight.dtype))
    conv.bias.copy_(b.to(conv.bias.dtype))
    for p in conv.parameters():
        p.requires_grad_(False)
    return conv


def bns_as_convs(model: nn.Module, names: list[str]) -> None:
    """Replace each named BatchNorm2d of `model` (ones that cannot be folded) by its depthwise 1x1 Conv2d."""
    for name in names:
        try:
            conv = bn_as_conv(get_module(model, name))
        except UnsupportedModelError as e:
            raise UnsupportedModelError(f"{name}: {e}") from None
        set_module(model, name, conv)

"""Reconstruction units: which modules BRECQ reconstructs as one block, which layer by layer.

Blocks are the residual blocks of torchvision (BasicBlock, Bottleneck, InvertedResidual) and of
zsq_fast.models.cifar_resnet (BasicBlock). Generic rule for other models: the outermost module that is not a
plain container (Sequential/ModuleList/ModuleDict) and holds 2..MAX_BLOCK_LAYERS quantized layers (an inverted
residual with its squeeze-excite inside is one unit, as BRECQ reconstructs MobileNetV2's blocks), or a larger one
with no such module inside (Res2Net's bottleneck). Quantized layers outside any block are reconstructed alone
(layer-wise fallback), and so are the layers of a block whose forward does not take one tensor (constant
keyword arguments that do not change its eval output, as efficientnet_pytorch's drop_connect_rate, are allowed:
cache.capture checks) and return one tensor.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..models.cifar_resnet import BasicBlock as CifarBasicBlock
from .modules import QUANT_LAYERS


def _known_blocks() -> tuple[type, ...]:
    known: list[type] = [CifarBasicBlock]
    try:
        from torchvision.models.mobilenetv2 import InvertedResidual
        from torchvision.models.resnet import BasicBlock, Bottleneck
        known += [BasicBlock, Bottleneck, InvertedResidual]
    except ImportError:  # torchvision is optional for the known-block list
        pass
    return tuple(known)


KNOWN_BLOCKS = _known_blocks()
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass
class Unit:
    name: str                 # module name inside the quantized model
    kind: str                 # "block" or "layer"
    layers: list[str]         # names of the quantized layers it holds


def _n_layers(m: nn.Module, layer_types=QUANT_LAYERS) -> int:
    return sum(isinstance(d, layer_types) for d in m.modules())


MAX_BLOCK_LAYERS = 8  # an inverted residual with squeeze-excite has 5; a whole stage of blocks has more


def is_block(m: nn.Module, layer_types=QUANT_LAYERS) -> bool:
    if isinstance(m, KNOWN_BLOCKS):
        return True
    if isinstance(m, _CONTAINERS) or isinstance(m, layer_types):
        return False
    # the outermost module of block size (visitors stop at the first block): an inverted residual is one unit
    # with its squeeze-excite inside, not three layers around an SE block
    n = _n_layers(m, layer_types)
    if n < 2 or any(isinstance(d, KNOWN_BLOCKS) for d in m.modules() if d is not m):
        return False
    return n <= MAX_BLOCK_LAYERS or not _block_below(m, layer_types)  # a larger module with no block inside too


def _block_below(m: nn.Module, layer_types) -> bool:
    return any(is_block(c, layer_types) or (isinstance(c, _CONTAINERS) and _block_below(c, layer_types))
               for c in m.children())


def find_blocks(model: nn.Module, order: list[str]) -> list[str]:
    """Names of the blocks find_units would reconstruct, found on the float model (Conv2d/Linear layers)."""
    layer_types = (nn.Conv2d, nn.Linear)
    found: list[str] = []

    def visit(prefix: str, m: nn.Module) -> None:
        for name, child in m.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(child, layer_types):
                continue
            if is_block(child, layer_types):
                found.append(full)
            else:
                visit(full, child)

    visit("", model)
    rank = {n: i for i, n in enumerate(order)}
    return sorted((b for b in found if b in rank), key=lambda b: rank[b])


def find_units(model: nn.Module, order: list[str], blocks: bool = True) -> list[Unit]:
    """Units in execution order (`order` = module names by first call). blocks=False: every layer alone."""
    units: list[Unit] = []

    def layers_in(prefix: str, m: nn.Module) -> list[str]:
        return [f"{prefix}.{n}" if n else prefix for n, d in m.named_modules() if isinstance(d, QUANT_LAYERS)]

    def visit(prefix: str, m: nn.Module) -> None:
        for name, child in m.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(child, QUANT_LAYERS):
                units.append(Unit(full, "layer", [full]))
            elif blocks and is_block(child):
                units.append(Unit(full, "block", layers_in(full, child)))
            else:
                visit(full, child)

    visit("", model)
    rank = {n: i for i, n in enumerate(order)}
    ran = [u for u in units if u.name in rank]
    return sorted(ran, key=lambda u: rank[u.name])


def split_block(unit: Unit, order: list[str]) -> list[Unit]:
    """Layer-wise fallback for a block: its layers as single units, in execution order."""
    rank = {n: i for i, n in enumerate(order)}
    names = sorted((n for n in unit.layers if n in rank), key=lambda n: rank[n])
    return [Unit(n, "layer", [n]) for n in names]

"""What quantize() can put on integer grids, checked on the model's structure before any work is done.

A module that holds parameters is supported when it is a Conv2d or Linear (its weight goes on a grid; a subclass
with its own forward, such as a "same" padding conv, runs that forward on the quantized weight, modules.py) or a
BatchNorm (folded into the layer that feeds it, or quantized as a depthwise 1x1 conv; library norm modules are
rewritten first, canonical.py). Anything else would stay float, which an integer accelerator cannot run: it is
refused, in one line naming its path and type and what would make it work. Modules named in `skip` are the
user's deliberate float modules.
"""
from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .trace import layer_level_modules

_LAYERS = (nn.Conv2d, nn.Linear)
_WHY = {  # what a refused type is, for the message
    (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm2d, nn.LocalResponseNorm):
        "a normalization over each image's own values, which cannot be folded into a conv",
    (nn.BatchNorm3d,): "a 3-D BatchNorm",
    (nn.PReLU,): "learned activation slopes",
    (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
        "a layer type zsq_fast has no quantized form of (Conv2d and Linear only)",
    (nn.MultiheadAttention, nn.Embedding, nn.RNNBase): "a layer type zsq_fast has no quantized form of",
}


def _why(m: nn.Module) -> str:
    for types, why in _WHY.items():
        if isinstance(m, types):
            return why
    return "parameters that are not a Conv2d/Linear weight or a BatchNorm (a layer computing with its own weights)"


def _is_supported(m: nn.Module) -> bool:
    if isinstance(m, _LAYERS):
        extra = [n for n, p in m.named_parameters() if n not in ("weight", "bias")]
        return not extra
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return not isinstance(m, nn.BatchNorm3d)
    return not any(p is not None for p in m._parameters.values())


def unsupported_modules(model: nn.Module, skip=()) -> list[tuple[str, nn.Module]]:
    """(path, module) of every module outside `skip` that holds parameters quantize cannot put on a grid."""
    skip = set(skip)
    bad = []
    for name, m in layer_level_modules(model):  # a layer's own children are checked with it
        if name in skip or _is_supported(m):
            continue
        bad.append((name or "the model", m))
    return bad


def check_supported(model: nn.Module, skip=()) -> None:
    """UnsupportedModelError (one line) for the first unsupported module and how many there are."""
    bad = unsupported_modules(model, skip)
    if not bad:
        return
    name, m = bad[0]
    more = f" (and {len(bad) - 1} more: {', '.join(n for n, _ in bad[1:4])}{', ...' if len(bad) > 4 else ''})" \
        if len(bad) > 1 else ""
    raise UnsupportedModelError(
        f"{name} ({type(m).__name__}) holds {_why(m)}; it would stay float, which integer hardware cannot run"
        f"{more}. zsq_fast quantizes Conv2d/Linear networks with BatchNorm; pass the module names in skip=[...] "
        f"(CLI: --skip) to keep them float deliberately")

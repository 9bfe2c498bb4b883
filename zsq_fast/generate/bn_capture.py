"""Find every BatchNorm of a model and capture its input with forward hooks.

Hooks (not torch.fx) so models fx cannot trace work too. Each BN layer l stores the
statistics of its own input: targets mu_l = running_mean, sigma_l = sqrt(running_var).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import NonFiniteError, UnsupportedModelError

BN_TYPES: tuple[type, ...] = (nn.modules.batchnorm._BatchNorm,)  # BatchNorm1d/2d/3d, SyncBatchNorm


def _is_bn(m: nn.Module) -> bool:
    if isinstance(m, BN_TYPES):
        return True
    # torchvision's FrozenBatchNorm2d (detection backbones); checked without importing torchvision,
    # whose import costs seconds: an instance exists only once torchvision is loaded.
    tv = sys.modules.get("torchvision.ops.misc")
    return tv is not None and isinstance(m, tv.FrozenBatchNorm2d)


@dataclass
class BNLayer:
    """One BN layer and the statistics of its input it remembers from training."""
    name: str
    module: nn.Module
    mean: torch.Tensor  # mu_l, float32 (C,)
    std: torch.Tensor   # sigma_l = sqrt(running_var), float32 (C,)

    @property
    def channels(self) -> int:
        return self.mean.numel()


def find_bn_layers(model: nn.Module) -> list[BNLayer]:
    """All BN layers in module order, with their targets; a clear error when there are none."""
    layers = []
    for name, m in model.named_modules():
        if not _is_bn(m):
            continue
        rm, rv = getattr(m, "running_mean", None), getattr(m, "running_var", None)
        if rm is None or rv is None:
            raise UnsupportedModelError(f"BatchNorm layer {name!r} tracks no running statistics "
                                        "(track_running_stats=False); there is nothing to match")
        if not (torch.isfinite(rm).all() and torch.isfinite(rv).all()):
            raise NonFiniteError(f"BatchNorm layer {name!r} has non-finite running statistics")
        layers.append(BNLayer(name, m, rm.detach().float().clone(), rv.detach().float().clamp_min(0).sqrt()))
    if not layers:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no BatchNorm layers (BatchNorm1d/2d, SyncBatchNorm, "
            "FrozenBatchNorm2d); BN-statistics data generation needs them")
    return layers


class BNCapture:
    """Context manager: while active, `acts[i]` is the input of layers[i] in the last forward."""

    def __init__(self, layers: list[BNLayer]):
        self.layers = layers
        self.acts: list[torch.Tensor | None] = [None] * len(layers)
        self._handles = []

    def _hook(self, i: int):
        def hook(module, inputs, output):
            if self.acts[i] is not None:
                raise UnsupportedModelError(f"BatchNorm layer {self.layers[i].name!r} runs more than once per forward; "
                                            "shared BN modules are not supported")
            self.acts[i] = inputs[0]
        return hook

    def __enter__(self) -> "BNCapture":
        self._handles = [l.module.register_forward_hook(self._hook(i)) for i, l in enumerate(self.layers)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()

    def clear(self) -> None:
        self.acts = [None] * len(self.layers)

    def take(self) -> list[torch.Tensor]:
        """The captured inputs of the last forward (and forget them)."""
        missing = [self.layers[i].name for i, a in enumerate(self.acts) if a is None]
        if missing:
            raise RuntimeError(f"BatchNorm layers {missing} did not run in the forward pass")
        acts, self.acts = self.acts, [None] * len(self.layers)
        return acts


def used_layers(model: nn.Module, layers: list[BNLayer], probe: torch.Tensor) -> list[BNLayer]:
    """Drop BN layers the forward never calls (e.g. an unused head), found with one probe input."""
    cap = BNCapture(layers)
    with cap, torch.no_grad():
        model(probe)
        used = [l for l, a in zip(layers, cap.acts) if a is not None]
    if not used:
        raise UnsupportedModelError(f"none of the BatchNorm layers of {type(model).__name__} runs in its forward pass")
    return used

"""Norm modules rewritten into the plain BatchNorm the rest of quantize knows, before the trace.

Model libraries wrap the normalization in their own modules; each is recognised by its structure, not its name:
- a norm with post-ops: a BatchNorm (or frozen BatchNorm) with child modules, whose forward normalizes and then
  applies its children in registration order (timm's BatchNormAct2d, SyncBatchNormAct, FrozenBatchNormAct2d:
  the normalization, then `drop`, then `act`). It becomes nn.Sequential(norm=<plain BatchNorm>, <its children>):
  the plain BN folds into the conv that feeds it (or is quantized as a depthwise 1x1 conv, fold.py), and the
  children stay modules, so the activation is a site (or fused into the conv) as any activation module is;
- a frozen BatchNorm (statistics and affine as buffers: torchvision's and timm's FrozenBatchNorm2d) and a
  SyncBatchNorm: the same affine map as an eval-mode nn.BatchNorm2d, which then folds like any BN.
Each rewrite is checked on the probe batch (the new module's output against the old one's on the same input);
a module whose forward is something else is refused, naming its path and type, never silently changed.
The rewrite depends on the architecture alone, so load_quantized replays it (without the check).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .fold import set_module

_STATS = ("running_mean", "running_var")


def _is_frozen_bn(m: nn.Module) -> bool:
    """Statistics and affine held as buffers, no parameters (FrozenBatchNorm2d of torchvision and timm)."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm) or any(True for _ in m.parameters(recurse=False)):
        return False
    b = dict(m.named_buffers(recurse=False))
    return all(k in b for k in (*_STATS, "weight", "bias")) and isinstance(getattr(m, "eps", None), float)


def _needs_rewrite(m: nn.Module) -> bool:
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and type(m) in (nn.BatchNorm1d, nn.BatchNorm2d):
        return False  # already plain
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return not isinstance(m, nn.BatchNorm3d)  # 3-D BN is not supported: refused later as a float module
    return _is_frozen_bn(m)


@torch.no_grad()
def plain_batchnorm(m: nn.Module) -> nn.BatchNorm1d | nn.BatchNorm2d:
    """The eval-mode BatchNorm computing `m`'s normalization (its children left out)."""
    mean, var = m.running_mean, m.running_var
    if mean is None or var is None:
        raise UnsupportedModelError(f"a {type(m).__name__} without running statistics (track_running_stats=False) "
                                    "cannot be folded")
    weight, bias = getattr(m, "weight", None), getattr(m, "bias", None)
    cls = nn.BatchNorm1d if isinstance(m, nn.BatchNorm1d) else nn.BatchNorm2d
    bn = cls(mean.numel(), eps=float(m.eps), affine=weight is not None or bias is not None).to(mean.device, mean.dtype)
    bn.running_mean.copy_(mean)
    bn.running_var.copy_(var)
    if bn.affine:
        bn.weight.copy_(weight if weight is not None else torch.ones_like(mean))
        bn.bias.copy_(bias if bias is not None else torch.zeros_like(mean))
        bn.weight.requires_grad_(False)
        bn.bias.requires_grad_(False)
    return bn.eval()


def replacement(m: nn.Module) -> nn.Module:
    """`m` as a plain BatchNorm, or nn.Sequential(norm=..., <children>) when it has children (module docstring)."""
    bn = plain_batchnorm(m)
    children = list(m.named_children())
    if not children:
        return bn
    if any(n == "norm" for n, _ in children):
        raise UnsupportedModelError(f"a {type(m).__name__} with a child named 'norm' cannot be split into its "
                                    "normalization and post-ops")
    return nn.Sequential(OrderedDict([("norm", bn), *children])).eval()


def _inside(name: str, names) -> bool:
    return any(name == n or name.startswith(n + ".") for n in names)


def norms_to_rewrite(model: nn.Module, keep=()) -> list[str]:
    """Names of the norm modules canonicalize() replaces, outermost first (a norm inside a norm is not visited);
    none in or under a name of `keep` (modules the user keeps float)."""
    names: list[str] = []
    for name, m in model.named_modules():
        if name and _needs_rewrite(m) and not _inside(name, names) and not _inside(name, keep):
            names.append(name)
    return names


@torch.no_grad()
def canonicalize(model: nn.Module, example: torch.Tensor | None = None, keep=()) -> list[str]:
    """Rewrite every norm module of `model` in place (module docstring) except those in `keep`; returns their names.

    With `example`, each rewritten module's new form is run on the input it saw and must give its output."""
    names = norms_to_rewrite(model, keep)
    if not names:
        return names
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if example is not None:
        def hook(name):
            def record(mod, args, out):
                if name not in seen and args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                    seen[name] = (args[0].detach().clone(), out.detach().clone())
            return record
        handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
        try:
            model(example)
        finally:
            for h in handles:
                h.remove()
    for name in names:
        old = model.get_submodule(name)
        try:
            new = replacement(old)
        except UnsupportedModelError as e:
            raise UnsupportedModelError(f"{name} ({type(old).__name__}): {e}") from None
        if name in seen:
            x, want = seen[name]
            got = new(x)
            tol = 1e-4 * float(want.abs().max()) + 1e-6
            if got.shape != want.shape or float((got - want).abs().max()) > tol:
                raise UnsupportedModelError(
                    f"{name} ({type(old).__name__}): a norm module whose forward is not its normalization followed "
                    f"by its child modules in order ({[n for n, _ in old.named_children()]}); it cannot be folded. "
                    f"Pass {name!r} in skip=[...] to keep it float deliberately")
        set_module(model, name, new)
    return names


@torch.no_grad()
def rewrite_norms(model: nn.Module, names) -> None:
    """Replay canonicalize's rewrites of `names` (from a saved quant_config) on a fresh copy of the architecture."""
    for name in names:
        set_module(model, name, replacement(model.get_submodule(name)))

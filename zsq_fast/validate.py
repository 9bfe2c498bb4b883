"""Checks at the entry and exit of generate/quantize: finite numbers, and a batch the model can take.

Each raises one zsq_fast error whose message says what is wrong and where (how many values, which
images, which layer, expected vs given shape), instead of a silently wrong model or a deep trace.
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import InvalidArgumentError, NonFiniteError, ShapeMismatchError

_SHOWN = 5  # indices/names listed in a message


def _listed(items: list, total: int) -> str:
    shown = ", ".join(str(i) for i in items[:_SHOWN])
    return shown + (f", ... ({total} in all)" if total > _SHOWN else "")


def check_finite_images(x: torch.Tensor, name: str, first_index: int = 0) -> None:
    """NonFiniteError naming how many values are NaN/inf and in which images (dim 0) of `name`."""
    bad = ~torch.isfinite(x.detach())
    if not bool(bad.any()):
        return
    per_image = bad.reshape(bad.shape[0], -1).sum(1) if bad.dim() else bad.reshape(1)
    idx = (torch.nonzero(per_image).flatten() + first_index).tolist()
    n_nan = int(torch.isnan(x.detach()).sum())
    raise NonFiniteError(f"{name} holds {int(bad.sum())} non-finite values ({n_nan} NaN, {int(bad.sum()) - n_nan} "
                         f"inf) in {len(idx)} of {x.shape[0] if x.dim() else 1} images (indices "
                         f"{_listed(idx, len(idx))}); pass finite, preprocessed images")


def check_finite_model(model: nn.Module, name: str = "model") -> None:
    """NonFiniteError naming the parameters/buffers of `model` that hold NaN or inf."""
    bad = []
    for pname, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t is not None and t.is_floating_point() and not bool(torch.isfinite(t.detach()).all()):
            bad.append(f"{pname} ({int((~torch.isfinite(t.detach())).sum())} of {t.numel()})")
    for mname, m in model.named_modules():
        rv = getattr(m, "running_var", None) if isinstance(m, nn.modules.batchnorm._NormBase) else None
        if isinstance(rv, torch.Tensor) and bool((rv < 0).any()):
            bad.append(f"{mname}.running_var (negative)")
    if bad:
        raise NonFiniteError(f"{name} has invalid weights (NaN/inf, or a negative BatchNorm variance) in "
                             f"{_listed(bad, len(bad))}; such a model cannot be calibrated or quantized")


def check_finite_activation(y: torch.Tensor, where: str, batch: slice) -> None:
    """NonFiniteError for NaN/inf in an activation the float model produced on calibration images."""
    if isinstance(y, torch.Tensor) and y.is_floating_point() and not bool(torch.isfinite(y.detach()).all()):
        n = int((~torch.isfinite(y.detach())).sum())
        raise NonFiniteError(f"the float model produces {n} non-finite values (NaN/inf) at {where} on calibration "
                             f"images {batch.start}..{batch.stop - 1}; the images are finite, so the model "
                             "overflows on them (check their scale and the model's weights)")


def as_device(device) -> torch.device:
    """A torch.device this machine has, or InvalidArgumentError naming the bad `device` argument."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InvalidArgumentError(f"device must be a torch.device or a name like 'cpu', 'cuda:0', got "
                                   f"{device!r:.80}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(f"device {device} requested but CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise InvalidArgumentError(f"device {device}: only cpu and cuda are supported")
    return device


def _expects(module: nn.Module) -> str | None:
    if isinstance(module, nn.Conv2d):
        return f"(N, {module.in_channels}, H, W)"
    if isinstance(module, nn.Linear):
        return f"(..., {module.in_features})"
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return f"{module.num_features} channels"
    return None


def probe_forward(model: nn.Module, x: torch.Tensor, name: str):
    """model(x) under no_grad; a failure becomes a ShapeMismatchError naming `name` (the argument and its
    shape), the module that failed, the input shape it expects and the shape it was given."""
    running: list[tuple[str, nn.Module, tuple]] = []
    handles = []

    def pre(mname):
        def hook(mod, args):
            shape = tuple(args[0].shape) if args and isinstance(args[0], torch.Tensor) else None
            running.append((mname, mod, shape))
        return hook

    for mname, mod in model.named_modules():
        if mname and not list(mod.children()):
            handles.append(mod.register_forward_pre_hook(pre(mname)))
    try:
        with torch.no_grad():
            return model(x)
    except Exception as exc:  # noqa: BLE001 - any failure on the probe means the model cannot take x
        cause = " ".join(str(exc).split())[:300]
        where = ""
        if running:
            mname, mod, shape = running[-1]
            exp = _expects(mod)
            where = (f" at layer {mname!r} ({type(mod).__name__}"
                     + (f", expects input {exp}" if exp else "") + f", given {shape})")
        raise ShapeMismatchError(f"the model cannot take {name}{where}: "
                                 f"{type(exc).__name__}: {cause}") from exc
    finally:
        for h in handles:
            h.remove()


def check_finite_result(model: nn.Module, name: str = "the quantized model") -> None:
    """The last step of quantize/load_quantized: every float tensor finite, every scale > 0."""
    for tname, t in model.state_dict().items():
        if not t.is_floating_point():
            continue
        if not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"{name} would hold {int((~torch.isfinite(t)).sum())} non-finite values in "
                                 f"{tname!r}; refusing to return it (calibration or reconstruction diverged)")
        if tname.endswith(".scale") and not bool((t > 0).all()):
            raise NonFiniteError(f"{name} would hold a non-positive scale in {tname!r}; refusing to return it")

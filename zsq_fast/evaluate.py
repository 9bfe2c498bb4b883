"""Top-1/top-5 accuracy and top-1 agreement with a reference (the float model) on an ImageSet.

Agreement = fraction of images where the quantized model's arg-max equals the float model's; it
needs no labels and is the fairer measure on degraded test sets (e.g. the JPEG CIFAR-10 copy).

`evaluate(load_model("efficientnet_lite0"), "../shared/data/imagenet_sample", classes="%4!=0")` reads a data
source (any form zsq_fast.data.load_images_for takes) with the LoadedModel's own preprocessing.
"""
from __future__ import annotations

import os

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import ImageSet, load_images_for
from .errors import InvalidTypeError
from .models.zoo import LoadedModel
from .report import autocast


@torch.no_grad()
def predict_logits(model: nn.Module, data: ImageSet, *, batch_size: int = 256, device="cpu",
                   precision: str = "fp32", progress: bool = False, desc: str = "predict") -> torch.Tensor:
    device = torch.device(device)
    model.eval()
    out = []
    with tqdm(total=data.n, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for x, _ in data.batches(batch_size):
            with autocast(device, precision):
                z = model(x.to(device))
            out.append(_check_logits(z, x.shape[0]).float().cpu())
            bar.update(x.shape[0])
    return torch.cat(out)


def accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    k = min(k, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    return (topk == labels[:, None]).any(1).float().mean().item()


def evaluate(model: nn.Module | LoadedModel, data: ImageSet | str | os.PathLike, *,
             reference: nn.Module | LoadedModel | None = None, reference_logits: torch.Tensor | None = None,
             batch_size: int = 256, device="cpu", precision: str = "fp32", progress: bool = False,
             classes=None, limit: int | None = None) -> dict:
    """{'n', 'top1', 'top5' (with labels), 'agreement' (with a reference)}; accuracies as percentages.
    data: an ImageSet, or a path read with the preprocessing of `model` (then a LoadedModel) or of
    `reference`; classes / limit select images (zsq_fast.data.parse_classes; the first N)."""
    data = _data(data, model, reference, classes, limit)
    model = model.model if isinstance(model, LoadedModel) else model
    reference = reference.model if isinstance(reference, LoadedModel) else reference
    logits = predict_logits(model, data, batch_size=batch_size, device=device, precision=precision,
                            progress=progress, desc="eval")
    result: dict = {"n": data.n}
    if data.labels is not None:
        if int(data.labels.max()) >= logits.shape[1] or int(data.labels.min()) < 0:
            raise ValueError(f"labels go up to {int(data.labels.max())} but the model has {logits.shape[1]} outputs")
        result["top1"] = round(100 * accuracy(logits, data.labels, 1), 3)
        if logits.shape[1] >= 5:
            result["top5"] = round(100 * accuracy(logits, data.labels, 5), 3)
    if reference is not None and reference_logits is None:
        reference_logits = predict_logits(reference, data, batch_size=batch_size, device=device,
                                          precision=precision, progress=progress, desc="eval float")
    if reference_logits is not None:
        result["agreement"] = round(100 * agreement(logits, reference_logits), 3)
    return result


def _data(data, model, reference, classes, limit) -> ImageSet:
    if isinstance(data, (str, os.PathLike)):
        src = next((m for m in (model, reference) if isinstance(m, LoadedModel)), None)
        if src is None:
            raise InvalidTypeError("evaluate on a path needs the model's preprocessing: pass the LoadedModel of "
                                   "zsq_fast.models.load_model, or an ImageSet from zsq_fast.data.load_images_for")
        return load_images_for(os.fspath(data), **src.preprocessing(), classes=classes, limit=limit)
    if not isinstance(data, ImageSet):
        raise InvalidTypeError(f"data must be an ImageSet or a path, got {type(data).__name__}")
    if classes is not None:
        data = data.select_classes(classes)
    if limit is not None and limit < data.n:
        data = data.subset(torch.arange(limit), f"{data.source}[:{limit}]")
    return data


def agreement(logits: torch.Tensor, reference_logits: torch.Tensor) -> float:
    if logits.shape != reference_logits.shape:
        raise ValueError(f"model outputs {tuple(logits.shape)} and reference outputs "
                         f"{tuple(reference_logits.shape)} differ")
    return (logits.argmax(1) == reference_logits.argmax(1)).float().mean().item()


def _check_logits(z, n: int) -> torch.Tensor:
    if isinstance(z, (tuple, list)):
        z = z[0]
    if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[0] != n:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"model output must be logits (N, classes); got {shape}")
    return z

"""fdda: Fine-grained Data Distribution Alignment (Zhong et al., ECCV 2022), on direct image
optimization (the paper trains a generator; the losses are the same).

Class centers c^mu_{c,l}, c^{sigma^2}_{c,l}: mean and variance of BN input l over a few real images
of class c. Synthetic images carry labels; each batch holds one class c and minimizes
    0.5 CE(f(x), c) + 0.2 L_BN + 0.9 L_D + 0.01 L_C
L_C: batch statistics -> c's centers, L_D: -> noisy centers N(c^mu, 0.5^2), N(c^{sigma^2}, 1.0^2)
redrawn every step; both on the deeper half of the BN layers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops import channel_mean_var, channel_stats
from .context import Run, check_finite, forward, grad_of, see, update
from .losses import bn_loss, center_loss, std_from_var


@dataclass
class ClassCenters:
    classes: torch.Tensor    # int64 (K,) class ids
    mean: list[torch.Tensor]  # per BN layer, (K, C_l): c^mu_{c,l}
    var: list[torch.Tensor]   # per BN layer, (K, C_l): c^{sigma^2}_{c,l} (biased, over N, H, W)


def select_per_class(images, labels, images_per_class: int, num_classes: int | None = None):
    """The first `images_per_class` real images of every class, from tensors or a dataset of
    (image, label) pairs. Returns (images, labels) sorted by class."""
    if images_per_class < 1:
        raise ValueError(f"images_per_class must be >= 1, got {images_per_class}")
    if isinstance(images, torch.Tensor):
        if labels is None:
            raise ValueError("fdda: real_labels are needed with a real_images tensor")
        labels = torch.as_tensor(labels).long().flatten()
        if images.dim() != 4 or images.shape[0] != labels.numel():
            raise ValueError(f"fdda: real_images must be (N, C, H, W) with one label each, got "
                             f"{tuple(images.shape)} and {labels.numel()} labels")
        pairs = zip(images, labels.tolist())
    else:  # a dataset / iterable of (image, label)
        pairs = ((torch.as_tensor(img), int(lab)) for img, lab in images)
    picked: dict[int, list[torch.Tensor]] = {}
    for img, lab in pairs:
        lab = int(lab)
        if num_classes is not None and not 0 <= lab < num_classes:
            raise ValueError(f"fdda: real label {lab} is outside the model's {num_classes} outputs")
        bucket = picked.setdefault(lab, [])
        if len(bucket) < images_per_class:
            bucket.append(img)
        if num_classes is not None and len(picked) == num_classes and \
                all(len(b) == images_per_class for b in picked.values()):
            break
    if not picked:
        raise ValueError("fdda: no real images given")
    classes = sorted(picked)
    x = torch.stack([img for c in classes for img in picked[c]]).float()
    y = torch.tensor([c for c in classes for _ in picked[c]], dtype=torch.long)
    return x, y


@torch.no_grad()
def class_centers(run: Run, images: torch.Tensor, labels: torch.Tensor) -> ClassCenters:
    """Mean and variance of every BN input over each class's real images."""
    classes = torch.unique(labels)
    mean = [[] for _ in run.layers]
    var = [[] for _ in run.layers]
    for c in classes.tolist():
        xc = images[labels == c]
        totals = None
        for i in range(0, xc.shape[0], run.chunk_size):
            acts, _ = forward(run, xc[i:i + run.chunk_size].to(run.device))
            s = [channel_stats(a) for a in acts[1:]]
            totals = s if totals is None else [t.merge(u) for t, u in zip(totals, s)]
        for l, t in enumerate(totals):
            mean[l].append(t.mean.float())
            var[l].append(t.var.float())
    return ClassCenters(classes, [torch.stack(m) for m in mean], [torch.stack(v) for v in var])


def synthetic_labels(n: int, classes: torch.Tensor) -> torch.Tensor:
    """Balanced labels in contiguous class blocks (so each batch holds one class)."""
    return classes[torch.arange(n) * classes.numel() // n]


def class_batches(labels: torch.Tensor, chunk_size: int) -> list[tuple[int, slice]]:
    """(class position k, slice) for every batch: one class per batch, at most chunk_size images."""
    batches = []
    start = 0
    for k, count in enumerate(torch.unique_consecutive(labels, return_counts=True)[1].tolist()):
        for i in range(start, start + count, chunk_size):
            batches.append((k, slice(i, min(i + chunk_size, start + count))))
        start += count
    return batches


def deep_layers(n_bn: int) -> range:
    """Indices (into the BN layer list) of the deeper half of the BN layers."""
    return range(n_bn // 2, n_bn)


def fdda_step(run: Run, views) -> dict:
    st = run.state
    centers: ClassCenters = st["centers"]
    w = st["weights"]
    deep = deep_layers(len(run.layers))
    # BNS-distorted targets, redrawn every step from the run's generator
    def noise(t: torch.Tensor, std: float) -> torch.Tensor:
        return std * torch.randn(t.shape, generator=run.generator).to(t.device)
    noisy = [(centers.mean[l] + noise(centers.mean[l], st["noise_mean_std"]),
              centers.var[l] + noise(centers.var[l], st["noise_var_std"])) for l in deep]
    totals = {"bn": 0.0, "ce": 0.0, "center": 0.0, "distort": 0.0, "total": 0.0}
    for k, sl in st["batches"]:
        x, m, v = run.store.load(sl, run.device, moments=True)
        x.requires_grad_(True)
        acts, logits = forward(run, see(run, x, None if views is None else views[sl]))
        mv = [channel_mean_var(a) for a in acts]
        l_bn = bn_loss([(mu, std_from_var(var)) for mu, var in mv], run.targets, run.weights, run.lambda_sigma)
        deep_stats = [mv[1 + l] for l in deep]
        l_c = center_loss(deep_stats, [(centers.mean[l][k], centers.var[l][k]) for l in deep])
        l_d = center_loss(deep_stats, [(nm[k], nv[k]) for nm, nv in noisy])
        y = st["labels"][sl].to(run.device)
        ce = F.cross_entropy(logits.float(), y)
        loss = w["ce"] * ce + w["bn"] * l_bn + w["distort"] * l_d + w["center"] * l_c
        check_finite(run, loss, "the fdda loss")
        update(run, sl, x.detach(), grad_of(run, loss, x), m, v)
        frac = (sl.stop - sl.start) / run.n
        for name, val in (("bn", l_bn), ("ce", ce), ("center", l_c), ("distort", l_d), ("total", loss)):
            totals[name] += float(val.detach()) * frac
    return totals

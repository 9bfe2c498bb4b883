"""fdda: Fine-grained Data Distribution Alignment (Zhong et al., ECCV 2022), on direct image
optimization (the paper trains a generator; the losses are the same).

Class centers c^mu_{c,l}, c^{sigma^2}_{c,l}: mean and variance of BN input l over a few real images
of class c. Synthetic images carry labels in contiguous class blocks; each batch b holds one class
c_b, and a step minimizes

    L = 0.2 L_BN(whole set) + sum_b |b|/N ( 0.5 CE(f(x_b), c_b) + 0.9 L_D,b + 0.01 L_C,b )

L_BN,l = ||mu_hat_l - running_mean_l||^2 / C_l + ||sigma_hat^2_l - running_var_l||^2 / C_l (variances, as
the FDDA code's BNS loss; dgh and bns match standard deviations). L_C,b: batch statistics -> c_b's
centers, L_D,b: -> noisy centers N(c^mu, 0.5^2), N(c^{sigma^2}, 1.0^2) redrawn every step; both averaged
over the deep BN layers (from floor((L+1)/2) - 2 on, as the FDDA code's start_layer). The lr schedule
watches the total with L_C in place of L_D (the noise alone would trigger reduce-on-plateau cuts). The
FDDA code applies L_BN (and a CE) to a batch of random mixed labels and L_C, L_D (and a CE) to a separate
single-class batch: the BN running statistics describe data of all
classes, and matching them on one class's batch would pull against L_C. Here every image has one
label, so L_BN is computed on the statistics of all N images (every class) with dgh's exact
whole-set machinery and its gradient injected per batch. The |b|/N weights give CE, L_C and L_D the
same per-image weight (1/N) as the whole-set L_BN, the ratio FDDA's equal-size batches give them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops import channel_mean_var, channel_stats
from .context import Run, check_finite, forward, grad_of, see, to_device, update, whole_set_bn
from .losses import bn_group_sums, center_loss
from .shards import reduce_sums
from .streaming import stream_of


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


def class_batches(labels: torch.Tensor, classes: torch.Tensor, chunk_size: int) -> list[tuple[int, slice]]:
    """(k, slice) for every batch: one class per batch, at most chunk_size images, where k is the
    row of the batch's class in `classes` (the class centers' order). Labels need not use every class."""
    batches = []
    start = 0
    values, counts = torch.unique_consecutive(labels, return_counts=True)
    for value, count in zip(values.tolist(), counts.tolist()):
        rows = (classes == value).nonzero().flatten()
        if rows.numel() != 1:
            raise ValueError(f"fdda: label {value} has no class center")
        for i in range(start, start + count, chunk_size):
            batches.append((int(rows[0]), slice(i, min(i + chunk_size, start + count))))
        start += count
    return batches


def deep_layers(n_bn: int) -> range:
    """Indices (into the BN layer list) of the deep BN layers: from floor((L+1)/2) - 2 on, as FDDA's
    code counts them (ResNet-18, L = 20: the last 12)."""
    return range(max(0, (n_bn + 1) // 2 - 2), n_bn)


def fdda_step(run: Run, views) -> dict:
    return fdda_gradients(run, views, lambda sl, x, g, m, v: update(run, sl, x, g, m, v))


def fdda_gradients(run: Run, views, on_grad) -> dict:
    """One step's losses; on_grad(sl, x, grad, exp_avg, exp_avg_sq) receives each batch's gradient
    of the step's L (module doc)."""
    st = run.state
    centers: ClassCenters = st["centers"]
    w = st["weights"]
    deep = deep_layers(len(run.layers))
    vsl = (lambda sl: None) if views is None else (lambda sl: views[sl])
    # pass 1: L_BN on the statistics of the whole (mixed-label) set, and its gradient w.r.t. them
    bn = whole_set_bn(run, lambda sl, canvas: see(run, canvas, vsl(sl)), "the fdda BN loss",
                      weight=w["bn"], spread="var")
    # BNS-distorted targets, redrawn every step from the run's generator
    def noise(t: torch.Tensor, std: float) -> torch.Tensor:
        return std * to_device(run, torch.randn(t.shape, generator=run.generator))
    noisy = [(centers.mean[l] + noise(centers.mean[l], st["noise_mean_std"]),
              centers.var[l] + noise(centers.var[l], st["noise_var_std"])) for l in deep]
    # pass 2: per single-class batch, its class terms plus its share of the whole-set L_BN gradient
    if "labels_dev" not in st:  # one copy to the device per run, not one per batch
        st["labels_dev"] = to_device(run, st["labels"])
    classes = [k for k, _ in st["batches"]]
    for i, (sl, (x, m, v)) in enumerate(stream_of(run).chunks([sl for _, sl in st["batches"]], moments=True)):
        k = classes[i]
        x.requires_grad_(True)
        acts, logits = forward(run, see(run, x, vsl(sl)))
        deep_stats = [channel_mean_var(acts[1 + l]) for l in deep]
        l_c = center_loss(deep_stats, [(centers.mean[l][k], centers.var[l][k]) for l in deep]) / len(deep)
        l_d = center_loss(deep_stats, [(nm[k], nv[k]) for nm, nv in noisy]) / len(deep)
        y = st["labels_dev"][sl]
        ce = F.cross_entropy(logits.float(), y)
        frac = (sl.stop - sl.start) / run.n_all
        class_terms = w["ce"] * ce + w["distort"] * l_d + w["center"] * l_c
        check_finite(run, class_terms, "the fdda loss")
        loss = frac * class_terms + bn.injected(acts)
        on_grad(sl, x.detach(), grad_of(run, loss, x), m, v)
        for name, val in (("ce", ce), ("center", l_c), ("distort", l_d)):
            run.sums.add(name, val, frac)  # on the device: read once, after the loop
    run.sums.add("bn", bn.loss)
    groups = bn_group_sums(bn.terms)
    for k, val in groups.items():
        run.sums.add(k, val)
    got = run.sums.read(run.step)  # the step's one host sync (raises for a failed finiteness check)
    out = {"bn": got["bn"], **{k: got.get(k, 0.0) for k in ("ce", "center", "distort")}}
    out.update(reduce_sums({k: out[k] for k in ("ce", "center", "distort")}))  # over the ranks
    out["total"] = w["bn"] * out["bn"] + sum(w[name] * out[name] for name in ("ce", "center", "distort"))
    # reduce-on-plateau watches the total without L_D's fresh noise (E[L_D] = L_C + a constant): the noise
    # alone would cut the lr
    out["schedule"] = out["total"] + w["distort"] * (out["center"] - out["distort"])
    return {**out, **{k: got[k] for k in groups}}

"""The demo's embedded task: scikit-learn's bundled 8x8 digits (no download), upsampled to 16x16.

A seeded split keeps a held-out test set the model never sees; the training split doubles as the
"real calibration data" baseline. The model is trained here, deterministically, in seconds.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data import ImageSet, from_uint8
from ..models.digits_cnn import DigitsCNN
from ..models.zoo import ZOO

SIZE = 16
MEAN, STD = ZOO["digits_cnn"].mean, ZOO["digits_cnn"].std


@dataclass
class DigitsSplit:
    train_x: np.ndarray  # uint8 (N, 16, 16, 1)
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray

    def train(self) -> ImageSet:
        return from_uint8(self.train_x, self.train_y, MEAN, STD, SIZE, "sklearn digits (train split)")

    def test(self) -> ImageSet:
        return from_uint8(self.test_x, self.test_y, MEAN, STD, SIZE, "sklearn digits (held-out test split)")


def load_digits_split(test_fraction: float = 0.3, seed: int = 0) -> DigitsSplit:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ValueError("the demo needs scikit-learn (its bundled digits): pip install 'zsq_fast[demo]'") from None
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).div_(16.0).unsqueeze(1)  # pixel values 0..16 -> [0, 1]
    x = F.interpolate(x, size=SIZE, mode="bilinear", align_corners=False)
    x = (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    y = d.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    test, train = order[:n_test], order[n_test:]
    return DigitsSplit(x[train], y[train], x[test], y[test])


def _shift(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Random translation by up to max_shift px with background padding (the digits' 0 pixel)."""
    n = x.shape[0]
    background = float((0 - MEAN[0]) / STD[0])
    padded = F.pad(x, (max_shift,) * 4, value=background)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    rows = (dy[:, None] + torch.arange(SIZE))[:, None, :, None].expand(n, x.shape[1], SIZE, SIZE + 2 * max_shift)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(SIZE))[:, None, None, :].expand(n, x.shape[1], SIZE, SIZE)
    return out.gather(3, cols)


def train_digits_cnn(split: DigitsSplit, *, epochs: int = 12, batch_size: int = 64, lr: float = 3e-3,
                     seed: int = 0, progress: bool = True) -> tuple[nn.Module, list[float]]:
    """Adam + one-cycle schedule with shift augmentation; returns the model (eval mode) and epoch losses."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = DigitsCNN()
    x, y = split.train().take(range(len(split.train_y)))
    steps = epochs * ((len(y) + batch_size - 1) // batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    losses = []
    model.train()
    for _ in tqdm(range(epochs), desc="train digits CNN", unit="epoch", disable=not progress, leave=False):
        perm = torch.randperm(len(y), generator=g)
        total = 0.0
        for i in range(0, len(y), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(_shift(x[idx], 2, g)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        losses.append(total / len(y))
    return model.eval(), losses

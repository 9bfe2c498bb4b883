"""RAdam applied chunk by chunk, and reduce-on-plateau.

RAdam is elementwise, so updating each chunk's slice of the images with its slice of the
moments gives exactly torch.optim.RAdam on the whole tensor (weight_decay 0), while only one
chunk needs to be on the device. The step count is shared: every image is updated once per step.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@torch.no_grad()
def radam_update_(x, grad, exp_avg, exp_avg_sq, step: int, lr: float,
                  betas=(0.9, 0.999), eps: float = 1e-8) -> None:
    """One RAdam step (Liu et al. 2020) on x in place; step counts from 1."""
    beta1, beta2 = betas
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * beta2 ** step / bc2
    if rho_t > 5.0:  # variance of the adaptive lr is tractable: rectified Adam step
        rect = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
        denom = exp_avg_sq.sqrt().add_(eps)
        x.addcdiv_(exp_avg, denom, value=-lr * rect * math.sqrt(bc2) / bc1)
    else:  # early steps: SGD with momentum
        x.add_(exp_avg, alpha=-lr / bc1)


@dataclass
class Plateau:
    """ReduceLROnPlateau (mode min, relative threshold); state is checkpointable.

    Unlike torch's scheduler, a cut also forgets the best loss (as the DGH code and MCT's DataGen do):
    the new lr is judged against losses seen at that lr only, so one lucky low loss before the cut
    cannot trigger the next cut `patience` steps later on a noisy loss."""
    lr: float
    patience: int
    factor: float = 0.5
    min_lr: float = 1e-4
    threshold: float = 1e-4
    best: float = math.inf
    num_bad: int = 0

    def step(self, loss: float) -> float:
        if loss < self.best * (1 - self.threshold):
            self.best, self.num_bad = loss, 0
        else:
            self.num_bad += 1
        if self.num_bad > self.patience:
            new_lr = max(self.lr * self.factor, self.min_lr)
            if self.lr - new_lr > 1e-12:
                self.lr = new_lr
            self.best, self.num_bad = math.inf, 0
        return self.lr

    def state(self) -> dict:
        return asdict(self)

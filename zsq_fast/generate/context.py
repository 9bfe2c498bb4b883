"""What every generator step needs: the model with BN capture, targets, the image store,
views, the chunk-wise RAdam update and the whole-set statistics pass."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import NonFiniteError
from ..ops import ChannelStats, channel_stats
from .bn_capture import BNCapture, BNLayer
from .losses import bn_loss, std_from_var
from .optim import Plateau, radam_update_
from .store import ImageStore
from .views import ViewParams, apply_view, final_view


class NonFiniteLossError(NonFiniteError):
    """The loss (or a gradient) became NaN/inf; the message names the step."""


@dataclass
class Run:
    model: nn.Module
    layers: list[BNLayer]            # BN layers; acts[0] is the input image, acts[1 + i] is layers[i]'s input
    capture: BNCapture
    targets: list[tuple[torch.Tensor, torch.Tensor]]  # (mu_l, sigma_l) on the device, input first
    weights: list[float]
    lambda_sigma: float
    store: ImageStore
    device: torch.device
    chunk_size: int
    size: tuple[int, int]            # output image size (h, w); the canvas may be larger
    lo: torch.Tensor                 # valid pixel range per channel in normalized space
    hi: torch.Tensor
    generator: torch.Generator       # every random draw of the loop (views, FDDA noise)
    plateau: Plateau
    augment: bool = False
    odsl_weight: float = 0.0
    odsl_hinged: bool = False
    amp_dtype: torch.dtype | None = None
    loss_scale: float = 1.0          # static scale for fp16 autocast (gradients would underflow)
    step: int = 0                    # RAdam step count (1-based once running)
    state: dict = field(default_factory=dict)  # method-specific (stale cache, FDDA centers, labels)

    @property
    def n(self) -> int:
        return self.store.n


def autocast(run: Run):
    if run.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(run.device.type, dtype=run.amp_dtype)


def forward(run: Run, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Model forward on x; returns ([x, BN inputs...], output)."""
    run.capture.clear()
    with autocast(run):
        out = run.model(x)
    return [x] + run.capture.take(), out


def see(run: Run, canvas: torch.Tensor, views: ViewParams | None) -> torch.Tensor:
    """What the model sees of a chunk this step (identity without augmentation)."""
    if views is None:
        return canvas
    return apply_view(canvas, views, run.size, run.lo, run.hi)


def output_images(run: Run, canvas: torch.Tensor) -> torch.Tensor:
    return final_view(canvas, run.size, run.lo, run.hi) if run.augment else canvas


def check_finite(run: Run, value: float | torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(torch.as_tensor(value)).all()):
        raise NonFiniteLossError(f"{what} is NaN or inf at step {run.step}; lower the learning rate (lr) or "
                                 "the loss weights (lambda_sigma, odsl_weight, fdda_weights), disable fp16, or "
                                 "check the model for overflow")


def update(run: Run, sl: slice, x: torch.Tensor, grad: torch.Tensor, exp_avg, exp_avg_sq) -> None:
    """RAdam on the chunk's slice, clip to the valid pixel range, write back to the store."""
    check_finite(run, grad, "the image gradient")
    radam_update_(x, grad, exp_avg, exp_avg_sq, run.step, run.plateau.lr)
    lo, hi = run.lo.view(1, -1, 1, 1), run.hi.view(1, -1, 1, 1)
    torch.maximum(torch.minimum(x, hi, out=x), lo, out=x)
    run.store.put(sl, x, exp_avg, exp_avg_sq)


def grad_of(run: Run, loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss * run.loss_scale if run.loss_scale != 1.0 else loss, x)
    return g / run.loss_scale if run.loss_scale != 1.0 else g


@torch.no_grad()
def whole_set_stats(run: Run, images_of_chunk) -> list[ChannelStats]:
    """Per-layer statistics over all N images, streamed chunk by chunk and merged exactly.
    images_of_chunk(sl) gives the device images the model sees for that chunk."""
    totals = None
    for sl in run.store.chunks(run.chunk_size):
        acts, _ = forward(run, images_of_chunk(sl))
        s = [channel_stats(a) for a in acts]
        totals = s if totals is None else [t.merge(u) for t, u in zip(totals, s)]
    return totals


def global_bn_loss(run: Run, totals: list[ChannelStats]) -> float:
    stats = [(t.mean, std_from_var(t.var)) for t in totals]
    return float(bn_loss(stats, run.targets, run.weights, run.lambda_sigma))


def measure_bn_loss(run: Run) -> float:
    """L_BN of the current output images over the whole set (the number the record reports)."""
    def images(sl):
        return output_images(run, run.store.load(sl, run.device))
    return global_bn_loss(run, whole_set_stats(run, images))

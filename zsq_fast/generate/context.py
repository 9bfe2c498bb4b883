"""What every generator step needs: the model with BN capture, targets, the image store,
views, the chunk-wise RAdam update and the whole-set statistics pass."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import NonFiniteError
from ..ops import ChannelStats, inject_stats_grad
from .bn_capture import BNCapture, BNLayer
from .fixed_order import FixedOrderStats, finish as finish_fixed_order
from .losses import bn_loss, bn_terms, std_from_var
from .optim import Plateau, radam_update_
from .shards import Shard
from .store import ImageStore
from .streaming import stream_of
from .views import ViewParams, apply_view, final_view


class NonFiniteLossError(NonFiniteError):
    """The loss (or a gradient) became NaN/inf; the message names the step."""


@dataclass
class LossScale:
    """Dynamic loss scaling for fp16 autocast, as torch.amp.GradScaler does it: start high, halve and
    recompute the chunk's gradient on inf/NaN, double after `growth_interval` clean gradients.

    Whole-set BN gradients are tiny (1/M with M = N*H*W elements per channel: about 1e-11 to 1e-9 at
    224 px), so a static scale of 1024 leaves them below fp16's smallest subnormal (6e-8) in the
    backward through the network; the scale must be able to grow.
    """
    value: float = 2.0 ** 16
    growth_interval: int = 20
    clean: int = 0
    max_value: float = 2.0 ** 40

    def state(self) -> dict:
        return {"value": self.value, "clean": self.clean}


class DeviceSums:
    """A step's loss sums and finiteness checks, kept on the device and read with one host sync (read).

    float(loss) or bool(isfinite(grad)) per chunk makes the host wait for the GPU to drain its queue that often;
    here a chunk only queues a few tiny kernels. Sums are float64, added in the order the loop adds them, so
    they equal the Python float sums they replace. A failed check raises at read, before the step is committed
    (a checkpoint, a run folder's state), naming the first check that failed, as an immediate check would."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.whats: list[str] = []                 # check k's message subject
        self.first_bad: torch.Tensor | None = None  # min k over the failed checks (inf: none)

    def add(self, name: str, value: torch.Tensor, weight: float = 1.0) -> None:
        v = value.detach().double()
        if weight != 1.0:
            v = v * weight
        prev = self.sums.get(name)
        self.sums[name] = v if prev is None else prev + v

    def check(self, value: torch.Tensor, what: str) -> None:
        k = len(self.whats)
        self.whats.append(what)
        bad = torch.where(torch.isfinite(value.detach()).all(), math.inf, float(k))
        self.first_bad = bad if self.first_bad is None else torch.minimum(self.first_bad, bad)

    def read(self, step: int) -> dict[str, float]:
        """The sums as floats (one transfer), after raising NonFiniteLossError for a failed check; then empty."""
        names, whats = list(self.sums), self.whats
        parts = [self.sums[n].reshape(1) for n in names]
        if self.first_bad is not None:
            parts.append(self.first_bad.reshape(1))
        self.clear()
        if not parts:
            return {}
        values = torch.cat([p.to(parts[0].device, torch.float64) for p in parts]).tolist()
        if len(values) > len(names) and values[-1] != math.inf:
            raise_non_finite(whats[int(values[-1])], step)
        return dict(zip(names, values))


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
    channels_last: bool = False      # the model sees NHWC images (the store and gradients stay NCHW)
    loss_scale: LossScale | None = None  # fp16 autocast only (gradients would underflow)
    step: int = 0                    # RAdam step count (1-based once running)
    shard: Shard | None = None       # this rank's images of the whole set (None: a single process owns all)
    state: dict = field(default_factory=dict)  # method-specific (stale cache, FDDA centers, labels)
    stream: object = None            # streaming.ChunkStream between store and device (stream_of(run))
    sums: DeviceSums = field(default_factory=DeviceSums)  # this step's device-side sums and checks

    @property
    def n(self) -> int:
        """Images in this rank's store."""
        return self.store.n

    @property
    def n_all(self) -> int:
        """Images of the whole set, over every rank."""
        return self.n if self.shard is None else self.shard.n_total


def autocast(run: Run):
    if run.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(run.device.type, dtype=run.amp_dtype)


def forward(run: Run, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Model forward on x; returns ([x, BN inputs...], output)."""
    run.capture.clear()
    if run.channels_last:  # convolutions then keep NHWC, which oneDNN runs faster on CPU
        x = x.contiguous(memory_format=torch.channels_last)
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


def raise_non_finite(what: str, step: int):
    raise NonFiniteLossError(f"{what} is NaN or inf at step {step}; lower the learning rate (lr) or "
                             "the loss weights (lambda_sigma, odsl_weight, fdda_weights), disable fp16, or "
                             "check the model for overflow")


def check_finite(run: Run, value: float | torch.Tensor, what: str) -> None:
    """A tensor is checked when the step reads its sums (run.sums.read: one sync per step, not one per chunk)."""
    if isinstance(value, torch.Tensor):
        run.sums.check(value, what)
    elif not math.isfinite(value):
        raise_non_finite(what, run.step)


def to_device(run: Run, t: torch.Tensor) -> torch.Tensor:
    """A host tensor (views, labels, noise drawn on the CPU generator) on the run's device without a sync: a
    plain .to(cuda) from pageable memory waits for the copy."""
    if run.device.type != "cuda" or t.device.type != "cpu":
        return t.to(run.device)
    return t.pin_memory().to(run.device, non_blocking=True)


def update(run: Run, sl: slice, x: torch.Tensor, grad: torch.Tensor, exp_avg, exp_avg_sq) -> None:
    """RAdam on the chunk's slice, clip to the valid pixel range, write back to the store."""
    check_finite(run, grad, "the image gradient")
    radam_update_(x, grad, exp_avg, exp_avg_sq, run.step, run.plateau.lr)
    lo, hi = run.lo.view(1, -1, 1, 1), run.hi.view(1, -1, 1, 1)
    torch.maximum(torch.minimum(x, hi, out=x), lo, out=x)
    stream_of(run).put(sl, x, exp_avg, exp_avg_sq)


def grad_of(run: Run, loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d loss / d x; under fp16 autocast through the dynamic loss scale (one finiteness check per chunk)."""
    scale = run.loss_scale
    if scale is None:
        (g,) = torch.autograd.grad(loss, x)
        return g
    while True:
        (g,) = torch.autograd.grad(loss * scale.value, x, retain_graph=True)
        if bool(torch.isfinite(g).all()) or scale.value <= 1.0:
            g = g / scale.value  # a non-finite gradient at scale 1 is the update's error to report
            scale.clean += 1
            if scale.clean >= scale.growth_interval and scale.value < scale.max_value:
                scale.value *= 2.0
                scale.clean = 0
            return g
        scale.value /= 2.0
        scale.clean = 0


@dataclass
class KeptChunk:
    """Pass 1's last chunk, run with autograd: pass 2 backpropagates through this graph instead of running
    that chunk's forward again (a forward per step saved; N <= chunk_size: pass 1's only forward)."""
    sl: slice
    x: torch.Tensor        # the leaf (requires grad): the chunk's canvases as loaded
    acts: list[torch.Tensor]
    logits: torch.Tensor


def whole_set_stats(run: Run, images_of_chunk, keep_last: bool = False):
    """Per-layer statistics over all N images, streamed chunk by chunk (across the ranks of a process group
    too: each rank streams its own chunks) and merged in an order fixed by the image indices
    (fixed_order.py): the same bits for any chunk size and number of ranks. images_of_chunk(sl, canvas)
    gives the device images the model sees for that chunk of this rank's store. keep_last: also return
    the last chunk's forward with autograd (KeptChunk), else None."""
    offset = 0 if run.shard is None else run.shard.start
    chunks = run.store.chunks(run.chunk_size)
    layers, kept = None, None
    for j, (sl, canvas) in enumerate(stream_of(run).chunks(chunks)):
        keep = keep_last and j == len(chunks) - 1
        with torch.enable_grad() if keep else torch.no_grad():
            if keep:
                canvas.requires_grad_(True)
            acts, logits = forward(run, images_of_chunk(sl, canvas))
        if keep:
            kept = KeptChunk(sl, canvas, acts, logits)
        layers = [FixedOrderStats() for _ in acts] if layers is None else layers
        for a, t in zip(acts, layers):
            t.add_chunk(offset + sl.start, a)
    totals = finish_fixed_order(layers)
    return (totals, kept) if keep_last else totals


@dataclass
class WholeSetBN:
    """Pass 1 of an exact step: the whole-set statistics, the per-layer BN loss terms on them, and the
    gradient of (weight * L_BN) w.r.t. every layer's whole-set mean and variance."""
    totals: list[ChannelStats]
    terms: list[torch.Tensor]
    loss: torch.Tensor
    grad_mean: list[torch.Tensor]
    grad_var: list[torch.Tensor]
    kept: KeptChunk | None = None

    def injected(self, acts: list[torch.Tensor]) -> torch.Tensor:
        """Pass 2 for one chunk: a zero whose backward adds the chunk's share of that gradient."""
        return sum(inject_stats_grad(a, t.mean, gm, gv, t.count)
                   for a, t, gm, gv in zip(acts, self.totals, self.grad_mean, self.grad_var))


def whole_set_bn(run: Run, images_of_chunk, what: str, weight: float = 1.0, spread: str = "std",
                 keep_last: bool = False) -> WholeSetBN:
    """L_BN over all N images (streamed, merged exactly) and its gradient w.r.t. the global statistics.

    spread: "std" matches sigma to sqrt(running_var) (DGH, MCT); "var" matches the variance to running_var
    (the GDFQ/FDDA code's MSE(var, running_var))."""
    totals, kept = whole_set_stats(run, images_of_chunk, keep_last=True) if keep_last else \
        (whole_set_stats(run, images_of_chunk), None)
    means = [t.mean.detach().clone().requires_grad_(True) for t in totals]
    variances = [t.var.detach().clone().requires_grad_(True) for t in totals]
    if spread == "var":
        stats, targets = list(zip(means, variances)), [(mu, sigma.square()) for mu, sigma in run.targets]
    elif spread == "std":
        stats, targets = [(mu, std_from_var(var)) for mu, var in zip(means, variances)], run.targets
    else:
        raise ValueError(f"spread must be 'std' or 'var', got {spread!r}")
    terms = bn_terms(stats, targets, run.weights, run.lambda_sigma)
    loss = sum(terms)
    check_finite(run, loss, what)
    grads = torch.autograd.grad(weight * loss if weight != 1.0 else loss, means + variances)
    return WholeSetBN(totals, terms, loss, list(grads[:len(means)]), list(grads[len(means):]), kept)


def global_bn_loss(run: Run, totals: list[ChannelStats]) -> float:
    stats = [(t.mean, std_from_var(t.var)) for t in totals]
    return float(bn_loss(stats, run.targets, run.weights, run.lambda_sigma))


def measure_bn_loss(run: Run) -> float:
    """L_BN of the current output images over the whole set (the number the record reports)."""
    return global_bn_loss(run, whole_set_stats(run, lambda sl, canvas: output_images(run, canvas)))

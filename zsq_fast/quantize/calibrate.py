"""Initial scales: min/max, percentile, or an MSE search over clipping ratios.

The MSE search (Sec. 4 of ALGORITHMS) tries R clipping ratios r in [1, 0.01] of the observed range
and keeps, per channel, the one minimising sum |x - x_hat|^p. It is one batched fake_quant call over
a (R * C, K) view, so it runs on the tensor's device for all channels and candidates at once.
Activations are per tensor: their range comes from every calibration element, the percentile and
MSE search from a sample of about `max_samples` elements spread over every image (ActObserver).
"""
from __future__ import annotations

import math

import torch

from .. import distributed
from ..errors import InvalidArgumentError
from ..ops import fake_quant
from .quantizer import QuantSpec

METHODS = ("mse", "minmax", "percentile")


def scale_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) so that the grid covers [lo, hi] (which always includes 0)."""
    qmin, qmax = spec.qrange
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    if spec.symmetric:
        amax = hi if not spec.signed else torch.maximum(-lo, hi)
        scale = amax / qmax
        zp = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / (qmax - qmin)
        scale = torch.clamp(scale, min=1e-8)
        zp = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    scale = torch.clamp(scale, min=1e-8)
    if spec.pow2:  # round up: the grid still covers [lo, hi] (the MSE search tries smaller ranges itself)
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    return scale, zp


def _lp_error(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, spec: QuantSpec, p: float) -> torch.Tensor:
    """x (C, K), scale/zp (R, C) -> sum_k |x - x_hat|^p as (R, C), one fake_quant call per candidate chunk."""
    r, c = scale.shape
    qmin, qmax = spec.qrange
    k = x.shape[1]
    step = max(1, min(r, (1 << 24) // max(1, c * k)))  # bound the (chunk, C, K) temporary to 16M elements
    out = []
    for i in range(0, r, step):
        s, z = scale[i:i + step], zp[i:i + step]
        n = s.shape[0]
        xx = x.unsqueeze(0).expand(n, c, k).reshape(n * c, k)
        x_hat = fake_quant(xx, s.reshape(-1).contiguous(), z.reshape(-1).contiguous(), qmin, qmax, axis=0)
        out.append((x_hat - xx).abs().pow(p).sum(1).view(n, c))
    return torch.cat(out)


def mse_search(x: torch.Tensor, spec: QuantSpec, *, candidates: int = 100, p: float = 2.4,
               lo: torch.Tensor | None = None, hi: torch.Tensor | None = None):
    """Best (scale, zero_point) per row of x (C, K) over clipping ratios linspace(1, 0.01, candidates)."""
    x = x.float()
    lo = x.min(1).values if lo is None else lo
    hi = x.max(1).values if hi is None else hi
    scale, zp = clipping_candidates(lo, hi, spec, candidates)
    err = _lp_error(x, scale, zp, spec, p)
    best = err.argmin(0)
    cols = torch.arange(x.shape[0], device=x.device)
    return scale[best, cols], zp[best, cols]


def clipping_candidates(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec, candidates: int = 100):
    """(scale, zero_point), each (R, C): the grids of the clipped ranges r * [lo, hi] for the ratios r in
    linspace(1, 0.01, candidates) (symmetric power-of-two grids: the distinct ones, largest first)."""
    ratios = torch.linspace(1.0, 0.01, candidates, device=lo.device).view(-1, 1)
    scale, zp = scale_from_range(ratios * lo, ratios * hi, spec)
    if spec.pow2 and spec.symmetric:
        scale, zp = _distinct_pow2(scale)
    return scale, zp


def _distinct_pow2(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric power-of-two candidates (R, C) -> the distinct powers of two they span, largest first.

    The ratios step by at most a factor of 2, so every exponent between the extremes occurs; the 100
    ratios collapse to about log2(100) + 1 = 8 grids, and the search result is unchanged."""
    e = torch.log2(scale).round()
    e_hi, e_lo = e[0], e[-1]
    j = torch.arange(int((e_hi - e_lo).max()) + 1, device=scale.device, dtype=scale.dtype).view(-1, 1)
    pow2 = torch.exp2(torch.maximum(e_hi - j, e_lo))
    return pow2, torch.zeros_like(pow2)


def _quantile_rows(x: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row q-quantile (0..1) of x (C, K) by sorting (no size limit, unlike torch.quantile)."""
    k = x.shape[1]
    idx = min(k - 1, max(0, int(round(q * (k - 1)))))
    return x.sort(1).values[:, idx]


def weight_scale(w: torch.Tensor, spec: QuantSpec, method: str = "mse", *, percentile: float = 99.99,
                 candidates: int = 100, p: float = 2.4):
    """Per-output-channel (scale, zero_point) of a weight (C_out, ...)."""
    x = w.detach().flatten(1).float()
    if method == "minmax":
        return scale_from_range(x.min(1).values, x.max(1).values, spec)
    if method == "percentile":
        lo, hi = _quantile_rows(x, 1 - percentile / 100), _quantile_rows(x, percentile / 100)
        if spec.symmetric and spec.signed:
            hi = _quantile_rows(x.abs(), percentile / 100)
            lo = -hi
        return scale_from_range(lo, hi, spec)
    if method == "mse":
        return mse_search(x, spec, candidates=candidates, p=p)
    raise InvalidArgumentError(f"unknown calibration {method!r}; choose one of {METHODS}")


class ActObserver:
    """Streams one activation tensor's range and a sample of its elements over the calibration set.

    The sample takes `per_image` = ceil(max_samples / n_images) elements of every image, at positions that
    depend only on the image's index in the whole set (a fixed random offset pattern shifted by the index):
    so the sample is the same however the set is batched or split across ranks, and `reduce()` (the
    ranks' ranges max-reduced, their samples gathered in rank order) gives every rank the sample and range
    a single process sees on the union of the shards."""

    _STRIDE = 7919  # shift between consecutive images' positions (prime: positions cycle through all offsets)

    def __init__(self, max_samples: int, n_images: int, generator: torch.Generator):
        self._lo, self._hi = math.inf, -math.inf  # the range read so far (lo, hi read the pending part)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # on the device: min, max since
        self.per_image = max(1, math.ceil(max_samples / max(1, n_images)))
        self.offsets = torch.rand(self.per_image, generator=generator, dtype=torch.float64)
        self.samples: list[torch.Tensor] = []

    @torch.no_grad()
    def observe(self, x: torch.Tensor, first_index: int = 0) -> None:
        """x: a batch (B, ...) of the activation for images first_index .. first_index + B - 1."""
        x = x.detach().float()
        if x.numel() == 0:
            return
        # kept on the device (a float() per batch and quantizer would wait for the GPU each time); min and max
        # pick values, so reading them once gives the same floats
        lo, hi = x.min(), x.max()
        p = self._pending
        self._pending = (lo, hi) if p is None else (torch.minimum(p[0], lo), torch.maximum(p[1], hi))
        x = x.reshape(x.shape[0], -1)
        m = x.shape[1]
        if m > self.per_image:
            base = (self.offsets * m).long().to(x.device)
            image = torch.arange(first_index, first_index + x.shape[0], device=x.device).view(-1, 1)
            x = x.gather(1, (base + image * self._STRIDE) % m)
        else:  # x may be the activation itself: an in-place op after the hook (out += identity) would change it
            x = x.clone()
        self.samples.append(x.reshape(-1))

    def reduce(self) -> None:
        """Make range and sample those of the whole set across the ranks (no-op in a single process)."""
        if not distributed.active():
            return
        dev = distributed.collective_device()
        r = torch.tensor([-self.lo, self.hi], dtype=torch.float64, device=dev)
        distributed.all_reduce_max_(r, "the activation observers' ranges")
        self._lo, self._hi = -float(r[0]), float(r[1])
        mine = torch.cat(self.samples).to(dev) if self.samples else torch.empty(0, device=dev)
        self.samples = [distributed.all_gather_cat(mine, "the activation observers' samples")]

    def _read(self) -> tuple[float, float]:
        if self._pending is not None:
            lo, hi = torch.stack(self._pending).tolist()
            self._lo, self._hi, self._pending = min(self._lo, lo), max(self._hi, hi), None
        return self._lo, self._hi

    @property
    def lo(self) -> float:
        """The smallest value observed (inf before any)."""
        return self._read()[0]

    @property
    def hi(self) -> float:
        return self._read()[1]

    @property
    def nonnegative(self) -> bool:
        return self.lo >= 0

    def scale(self, spec: QuantSpec, method: str, *, percentile: float = 99.99, candidates: int = 100,
              p: float = 2.4):
        if not self.samples:
            raise InvalidArgumentError("activation quantizer saw no data during calibration")
        x = torch.cat(self.samples).view(1, -1)
        dev = x.device
        lo, hi = torch.tensor([self.lo], device=dev), torch.tensor([self.hi], device=dev)
        if method == "minmax":
            return scale_from_range(lo, hi, spec)
        if method == "percentile":
            if spec.symmetric and spec.signed:
                hi = _quantile_rows(x.abs(), percentile / 100)
                lo = -hi
            else:
                lo, hi = _quantile_rows(x, 1 - percentile / 100), _quantile_rows(x, percentile / 100)
            return scale_from_range(lo, hi, spec)
        if method == "mse":
            return mse_search(x, spec, candidates=candidates, p=p, lo=lo, hi=hi)
        raise InvalidArgumentError(f"unknown calibration {method!r}; choose one of {METHODS}")


# Factors the logits are scaled by when a clipping's rank safety is counted (top1_preserving_scale): half an
# octave either way, one power-of-two grid step in all. Measured on CIFAR-10 ResNet-20 W2A4 (RESULTS.md, sixth
# session of 2026-12-02): the quantized network's median top logit is 0.75x on test images what it is on the
# training images it was calibrated with, and 1.2x what it is on DGH images.
MAGNITUDE_SHIFTS = tuple(2.0 ** (k / 4) for k in (-2, -1, 0, 1, 2))


def top1_preserving_scale(logits: torch.Tensor, reference_top1: torch.Tensor, spec: QuantSpec, *,
                          candidates: int = 100, p: float = 2.4):
    """(scale, zero_point) of the network output that keeps each sample's top-1.

    An MSE search over all logits fits the bulk of a many-class output and clips its top (4-bit logits of a
    1000-class head saturate at qmax, tying the leading classes). Here each candidate clipping (those of
    mse_search: clipping_candidates) is scored first by the samples whose quantized logits do not single out
    the reference class (a different argmax, or a tie at the maximum level), then by the L_p error; the best
    one is kept. The first count is summed over the logits scaled by each of MAGNITUDE_SHIFTS: the images a
    model meets later give logits of another magnitude than the calibration images (training images larger,
    generated images smaller), and a clipping that is rank-safe only at the calibration magnitude picks,
    with power-of-two scales, a grid twice too fine or too coarse. logits (N, C, ...): the class axis is 1;
    reference_top1 (N, ...): the float model's argmax."""
    x = logits.detach().float().movedim(1, -1).reshape(-1, logits.shape[1])
    ref = reference_top1.reshape(-1).to(x.device)
    scale, zp = clipping_candidates(x.min().view(1), x.max().view(1), spec, candidates)  # (R, 1)
    qmin, qmax = spec.qrange
    shifted = [x * g for g in MAGNITUDE_SHIFTS]  # the same for every candidate
    wrongs, errors = [], []
    for i in range(scale.shape[0]):
        s, z = scale[i].contiguous(), zp[i].contiguous()
        wrong = 0
        for xg in shifted:
            x_hat = fake_quant(xg, s, z, qmin, qmax, None)
            top = x_hat.max(1, keepdim=True).values
            wrong = wrong + ((x_hat.argmax(1) != ref) | ((x_hat == top).sum(1) > 1)).sum()
        wrongs.append(wrong)
        errors.append((fake_quant(x, s, z, qmin, qmax, None) - x).abs().pow(p).sum())
    # one read for all candidates, not two per candidate (each a GPU sync); counts and float32 sums are exact in
    # float64, and min() keeps the first of equal keys, as a strict < over the candidates in order does
    keys = torch.stack([torch.stack(wrongs).double(), torch.stack(errors).double()], 1).tolist()
    best = min(range(len(keys)), key=lambda i: (keys[i][0], keys[i][1]))
    return scale[best], zp[best]

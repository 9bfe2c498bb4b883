"""Per-channel BN-input statistics streamed across chunks (op 1).

`channel_stats(x)` gives one chunk's (count, mean, M2); `ChannelStats.merge` combines chunks
with Chan's parallel update in float64, so k chunks equal the one-shot statistics of their
concatenation. `inject_stats_grad` feeds dL/d(global mean, var) back into one chunk through
the fused backward dL/dx = g_mean/M + g_var * 2 (x - mean)/M, which lets a generator optimize
a whole image set jointly with the memory of one chunk.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import reference as ref
from ._backend import _C, use_kernel
from .checks import check_float


def _check_activation(x: torch.Tensor) -> None:
    check_float(x, "x")
    if x.dim() < 2:
        raise ValueError(f"x must have shape (N, C, *spatial), got {tuple(x.shape)}")


def _forward(x: torch.Tensor) -> torch.Tensor:
    if use_kernel(x):
        return _C.channel_stats_forward(x)
    return ref.channel_stats_forward(x)


def _backward(x, mean, grad_mean, grad_var, total_count) -> torch.Tensor:
    if use_kernel(x):
        cd = ref.compute_dtype(x.dtype)
        return _C.channel_stats_backward(x, mean.to(cd).contiguous(), grad_mean.to(cd).contiguous(),
                                         grad_var.to(cd).contiguous(), float(total_count))
    return ref.channel_stats_backward(x, mean, grad_mean, grad_var, total_count)


@dataclass
class ChannelStats:
    """count, per-channel mean and M2 (sum of squared deviations), all float64."""
    count: float
    mean: torch.Tensor
    m2: torch.Tensor

    @classmethod
    def empty(cls, channels: int, device=None) -> "ChannelStats":
        z = torch.zeros(channels, dtype=torch.float64, device=device)
        return cls(0.0, z, z.clone())

    def merge(self, other: "ChannelStats") -> "ChannelStats":
        """Chan et al.'s pairwise update; exact up to float64 rounding for any split."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta.square() * (self.count * other.count / n)
        return ChannelStats(n, mean, m2)

    @property
    def var(self) -> torch.Tensor:
        """Biased (population) variance, as BN normalizes with."""
        if self.count == 0:
            return torch.zeros_like(self.m2)
        return self.m2 / self.count

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()


def channel_stats(x: torch.Tensor) -> ChannelStats:
    """Statistics of one chunk x (N, C, *spatial); no autograd."""
    _check_activation(x)
    count = float(x.numel() // x.shape[1]) if x.shape[1] else 0.0
    out = _forward(x.detach())
    return ChannelStats(count, out[0], out[1])


class _ChannelMeanVar(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        stats = channel_stats(x)
        ctx.save_for_backward(x, stats.mean)
        ctx.count = stats.count
        cd = ref.compute_dtype(x.dtype)
        return stats.mean.to(cd), stats.var.to(cd)

    @staticmethod
    def backward(ctx, g_mean, g_var):
        x, mean = ctx.saved_tensors
        if g_mean is None:
            g_mean = torch.zeros_like(mean)
        if g_var is None:
            g_var = torch.zeros_like(mean)
        return _backward(x, mean, g_mean, g_var, ctx.count)


def channel_mean_var(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable per-channel mean and biased variance of one batch (fp32, fp64 for fp64 x)."""
    _check_activation(x)
    if x.numel() == 0:
        raise ValueError("channel_mean_var needs a non-empty batch")
    return _ChannelMeanVar.apply(x)


class _InjectStatsGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mean, grad_mean, grad_var, total_count):
        ctx.save_for_backward(x, mean, grad_mean, grad_var)
        ctx.total_count = total_count
        return x.new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, g):
        x, mean, grad_mean, grad_var = ctx.saved_tensors
        dx = _backward(x, mean, grad_mean, grad_var, ctx.total_count)
        return dx * g.to(dx.dtype), None, None, None, None


def inject_stats_grad(x: torch.Tensor, mean: torch.Tensor, grad_mean: torch.Tensor,
                      grad_var: torch.Tensor, total_count: float) -> torch.Tensor:
    """A zero scalar whose backward adds, to x's gradient, the chunk's share of a loss on the
    global statistics (mean, var over total_count elements per channel). Add it to the loss."""
    _check_activation(x)
    c = x.shape[1]
    for name, t in (("mean", mean), ("grad_mean", grad_mean), ("grad_var", grad_var)):
        if t.numel() != c:
            raise ValueError(f"{name} has {t.numel()} elements, x has {c} channels")
    if total_count <= 0:
        raise ValueError(f"total_count must be > 0, got {total_count}")
    return _InjectStatsGrad.apply(x, mean.detach(), grad_mean.detach(), grad_var.detach(), float(total_count))


def channel_stats_backward(x, mean, grad_mean, grad_var, total_count) -> torch.Tensor:
    """The raw fused backward (see module doc), for callers that manage autograd themselves."""
    _check_activation(x)
    return _backward(x, mean, grad_mean, grad_var, total_count)

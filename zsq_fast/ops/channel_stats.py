"""Per-channel BN-input statistics streamed across chunks (op 1).

`channel_stats(x, running)` gives a chunk's (count, mean, M2), merged on the device into running
statistics when given (Chan's parallel update in float64, inside the kernel), so k chunks equal the
one-shot statistics of their concatenation with one kernel launch pair per chunk. `inject_stats_grad`
feeds dL/d(global mean, var) back into one chunk through the fused backward
dL/dx = g_mean/M + g_var * 2 (x - mean)/M, which lets a generator optimize a whole image set jointly
with the memory of one chunk.
"""
from __future__ import annotations

import torch

from ..errors import InvalidArgumentError
from . import reference as ref
from ._backend import _C  # noqa: F401  (loads and registers the operators)
from ._fakes import dense_like
from .checks import check_float

_op = torch.ops.zsq_fast.channel_stats
_backward_op = torch.ops.zsq_fast.channel_stats_backward


@torch.library.register_fake("zsq_fast::channel_stats")
def _(x, running=None, running_count=0.0):
    return x.new_empty((2, x.shape[1]), dtype=torch.float64)


@torch.library.register_fake("zsq_fast::channel_stats_backward")
def _(x, mean, grad_mean, grad_var, total_count, grad_scale=None):
    return dense_like(x)


def _count(x: torch.Tensor) -> float:
    return float(x.numel() // x.shape[1]) if x.shape[1] else 0.0


def _stats_setup(ctx, inputs, output):
    x, running, running_count = inputs
    ctx.save_for_backward(x, output)
    ctx.total = _count(x) + float(running_count)


def _stats_backward(ctx, g):
    # out = (mean, M2) of the merged set of N elements: d mean/dx = 1/N and d M2/dx = 2 (x - mean),
    # so dL/dx = g_mean/N + (N g_M2) 2 (x - mean)/N: the fused backward with grad_var = N g_M2.
    # The running statistics are constants (no gradient).
    x, out = ctx.saved_tensors
    if ctx.total == 0:
        return torch.zeros_like(x), None, None
    dx = _backward_op(x, out[0], g[0], g[1] * ctx.total, ctx.total)
    return dx, None, None


torch.library.register_autograd("zsq_fast::channel_stats", _stats_backward, setup_context=_stats_setup)


class ChannelStats:
    """count (a float) and per-channel mean and M2 (sum of squared deviations), float64, held as one
    (2, C) tensor `data` so the kernel merges into it without a copy."""

    __slots__ = ("count", "data")

    def __init__(self, count: float, mean: torch.Tensor | None = None, m2: torch.Tensor | None = None, *,
                 data: torch.Tensor | None = None):
        self.count = float(count)
        self.data = data if data is not None else torch.stack([mean.double(), m2.double()])

    @property
    def mean(self) -> torch.Tensor:
        return self.data[0]

    @property
    def m2(self) -> torch.Tensor:
        return self.data[1]

    @classmethod
    def empty(cls, channels: int, device=None) -> "ChannelStats":
        return cls(0.0, data=torch.zeros(2, channels, dtype=torch.float64, device=device))

    def merge(self, other: "ChannelStats") -> "ChannelStats":
        """Chan et al.'s pairwise update; exact up to float64 rounding for any split."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        mean, m2 = ref.chan_merge(self.count, self.mean, self.m2, other.count, other.mean, other.m2)
        return ChannelStats(self.count + other.count, mean, m2)

    @property
    def var(self) -> torch.Tensor:
        """Biased (population) variance, as BN normalizes with."""
        if self.count == 0:
            return torch.zeros_like(self.m2)
        return self.m2 / self.count

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()

    def __repr__(self) -> str:
        return f"ChannelStats(count={self.count}, channels={self.data.shape[1]})"


def _check_activation(x: torch.Tensor) -> None:
    check_float(x, "x")
    if x.dim() < 2:
        raise InvalidArgumentError(f"x must have shape (N, C, *spatial), got {tuple(x.shape)}")


def channel_stats(x: torch.Tensor, running: ChannelStats | None = None) -> ChannelStats:
    """Statistics of one chunk x (N, C, *spatial), merged into `running` when given; no autograd."""
    _check_activation(x)
    if running is not None and running.data.shape[1] != x.shape[1]:
        raise InvalidArgumentError(f"running statistics have {running.data.shape[1]} channels, x has {x.shape[1]}")
    count = _count(x)
    if running is None or running.count == 0:
        return ChannelStats(count, data=_op(x.detach()))
    return ChannelStats(running.count + count, data=_op(x.detach(), running.data, running.count))


def channel_mean_var(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable per-channel mean and biased variance of one batch (fp32, fp64 for fp64 x)."""
    _check_activation(x)
    if x.numel() == 0:
        raise InvalidArgumentError("channel_mean_var needs a non-empty batch")
    out = _op(x)
    cd = ref.compute_dtype(x.dtype)
    return out[0].to(cd), (out[1] / _count(x)).to(cd)


# A zero scalar whose backward injects a chunk's share of a loss on whole-set statistics. The upstream
# gradient (a loss scale, for instance) is folded into the kernel's per-channel coefficients before
# anything is cast to x's dtype, so an fp16 chunk keeps gradients far below fp16's smallest normal.
@torch.library.custom_op("zsq_fast::inject_stats_grad", mutates_args=())
def _inject(x: torch.Tensor, mean: torch.Tensor, grad_mean: torch.Tensor, grad_var: torch.Tensor,
            total_count: float) -> torch.Tensor:
    return x.new_zeros((), dtype=torch.float32)


@_inject.register_fake
def _(x, mean, grad_mean, grad_var, total_count):
    return x.new_empty((), dtype=torch.float32)


def _inject_setup(ctx, inputs, output):
    x, mean, grad_mean, grad_var, total_count = inputs
    ctx.save_for_backward(x, mean, grad_mean, grad_var)
    ctx.total_count = total_count


def _inject_backward(ctx, g):
    x, mean, grad_mean, grad_var = ctx.saved_tensors
    dx = _backward_op(x, mean, grad_mean, grad_var, ctx.total_count, g)
    return dx, None, None, None, None


_inject.register_autograd(_inject_backward, setup_context=_inject_setup)


def inject_stats_grad(x: torch.Tensor, mean: torch.Tensor, grad_mean: torch.Tensor,
                      grad_var: torch.Tensor, total_count: float) -> torch.Tensor:
    """A zero scalar whose backward adds, to x's gradient, the chunk's share of a loss on the
    global statistics (mean, var over total_count elements per channel). Add it to the loss."""
    _check_activation(x)
    c = x.shape[1]
    for name, t in (("mean", mean), ("grad_mean", grad_mean), ("grad_var", grad_var)):
        if t.numel() != c:
            raise InvalidArgumentError(f"{name} has {t.numel()} elements, x has {c} channels")
    if total_count <= 0:
        raise InvalidArgumentError(f"total_count must be > 0, got {total_count}")
    return _inject(x, mean.detach(), grad_mean.detach(), grad_var.detach(), float(total_count))


def channel_stats_backward(x, mean, grad_mean, grad_var, total_count, grad_scale=None) -> torch.Tensor:
    """The raw fused backward (see module doc), for callers that manage autograd themselves."""
    _check_activation(x)
    return _backward_op(x, mean, grad_mean, grad_var, float(total_count), grad_scale)

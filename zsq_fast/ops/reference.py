"""Pure-PyTorch references of every kernel in csrc/.

They define the semantics the C++/CUDA kernels must reproduce and are the fallback
when the extension is not built. Arithmetic is fp32 for fp16/bf16/fp32 inputs and fp64
for fp64 inputs, as in the kernels; results are cast back to the input dtype.
"""
from __future__ import annotations

import torch

# AdaRound rectified-sigmoid stretch (Nagel et al. 2020).
ZETA = 1.1
GAMMA = -0.1


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def channel_view(t: torch.Tensor, ndim: int, axis: int | None) -> torch.Tensor:
    """Reshape a per-channel vector so it broadcasts along `axis` of an ndim tensor."""
    if axis is None:
        return t.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


# ---------------------------------------------------------------- op 1: channel statistics
def channel_stats_forward(x: torch.Tensor) -> torch.Tensor:
    """Per-channel (mean, M2) of x (N, C, *spatial) over every dim but 1, as a (2, C) float64 tensor.

    M2 = sum (x - mean)^2. An empty chunk gives zeros. NaN/inf propagate.
    """
    c = x.shape[1]
    xd = x.detach().to(torch.float64).transpose(0, 1).reshape(c, -1)
    if xd.shape[1] == 0:
        return torch.zeros(2, c, dtype=torch.float64, device=x.device)
    mean = xd.mean(1)
    m2 = (xd - mean[:, None]).square().sum(1)
    return torch.stack([mean, m2])


def chan_merge(count_a: float, mean_a: torch.Tensor, m2_a: torch.Tensor, count_b: float, mean_b: torch.Tensor,
               m2_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Chan et al.'s pairwise update of (count, mean, M2); exact up to float64 rounding for any split.
    The kernels' device merge (csrc/common.h chan_merge) uses the same operation order. Both counts > 0."""
    n = count_a + count_b
    delta = mean_b - mean_a
    return mean_a + delta * (count_b / n), m2_a + m2_b + delta.square() * (count_a * count_b / n)


def channel_stats_backward(x: torch.Tensor, mean: torch.Tensor, grad_mean: torch.Tensor,
                           grad_var: torch.Tensor, total_count: float) -> torch.Tensor:
    """dL/dx for one chunk given dL/dmean and dL/dvar of the statistics over all chunks.

    dL/dx = g_mean/M + g_var * 2 (x - mean) / M, M = total_count, var = M2 / M (biased).
    Same dtype and memory format as x.
    """
    cd = compute_dtype(x.dtype)
    v = lambda t: channel_view(t.to(cd), x.dim(), 1)  # noqa: E731
    inv_m = 1.0 / float(total_count)
    dx = v(grad_mean) * inv_m + v(grad_var) * (2.0 * inv_m) * (x.to(cd) - v(mean))
    return dx.to(x.dtype)


# ---------------------------------------------------------------- op 2: fake quantization
def fake_quant_forward(x, scale, zero_point, qmin: int, qmax: int, axis: int | None):
    """x_hat = s * (clamp(round(x / s) + z, qmin, qmax) - z); round half to even; NaN propagates."""
    cd = compute_dtype(x.dtype)
    s = channel_view(scale.to(cd), x.dim(), axis)
    z = channel_view(zero_point.to(cd), x.dim(), axis)
    q = torch.clamp(torch.round(x.to(cd) / s) + z, qmin, qmax)
    return ((q - z) * s).to(x.dtype)


def fake_quant_backward(grad, x, scale, zero_point, qmin: int, qmax: int, axis: int | None,
                        need_scale_grad: bool = True):
    """Straight-through gradient for x (zero where round(x/s)+z falls outside [qmin, qmax])
    and the LSQ gradient for s: d x_hat/ds = (q - z) - [inside] * x / s, summed over all dims
    but `axis` (everything for per-tensor). Returns (grad_x, grad_scale or None)."""
    cd = compute_dtype(x.dtype)
    s = channel_view(scale.to(cd), x.dim(), axis)
    z = channel_view(zero_point.to(cd), x.dim(), axis)
    xs = x.to(cd) / s
    r = torch.round(xs) + z
    inside = (r >= qmin) & (r <= qmax)
    g = grad.to(cd)
    grad_x = (g * inside).to(x.dtype)
    if not need_scale_grad:
        return grad_x, None
    q = torch.clamp(r, qmin, qmax)
    dsc = g * ((q - z) - inside * xs)
    if axis is None:
        grad_s = dsc.sum().reshape(scale.shape)
    else:
        dims = [d for d in range(x.dim()) if d != axis]
        grad_s = dsc.sum(dims) if dims else dsc
    return grad_x, grad_s.to(scale.dtype)


# ---------------------------------------------------------------- op 3: AdaRound
def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def adaround_forward(w, v, scale, zero_point, qmin: int, qmax: int, axis: int | None,
                     hard: bool, beta: float, compute_reg: bool):
    """w_hat = s * (clamp(floor(w/s) + h(V) + z, qmin, qmax) - z), h = rectified sigmoid (soft)
    or 1[V >= 0] (hard). Also returns reg = sum(1 - |2h - 1|^beta) as a 0-dim tensor of the compute
    dtype (float32; float64 for float64 w), zero when compute_reg is False."""
    cd = compute_dtype(w.dtype)
    s = channel_view(scale.to(cd), w.dim(), axis)
    z = channel_view(zero_point.to(cd), w.dim(), axis)
    vv = v.to(cd)
    h = (vv >= 0).to(cd) if hard else rectified_sigmoid(vv)
    q = torch.clamp(torch.floor(w.to(cd) / s) + h + z, qmin, qmax)
    w_hat = ((q - z) * s).to(w.dtype)
    if compute_reg:
        reg = (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()
    else:
        reg = torch.zeros((), dtype=cd, device=w.device)
    return w_hat, reg


def adaround_backward(grad_w_hat, grad_reg, w, v, scale, zero_point, qmin: int, qmax: int,
                      axis: int | None, beta: float):
    """dL/dV = g * s * dh/dV * [floor(w/s)+h+z inside [qmin, qmax]]
             + grad_reg * d/dV sum(1 - |2h-1|^beta),
    dh/dV = (zeta-gamma) sigmoid(V)(1 - sigmoid(V)) where h is not clipped to 0 or 1, else 0.
    grad_reg is a 0-dim compute-dtype tensor (the upstream gradient of the regularizer). Returns grad_v (v's dtype)."""
    cd = compute_dtype(w.dtype)
    s = channel_view(scale.to(cd), w.dim(), axis)
    z = channel_view(zero_point.to(cd), w.dim(), axis)
    vv = v.to(cd)
    sig = torch.sigmoid(vv)
    h_lin = sig * (ZETA - GAMMA) + GAMMA
    live = (h_lin > 0) & (h_lin < 1)
    h = torch.clamp(h_lin, 0.0, 1.0)
    dh = (ZETA - GAMMA) * sig * (1 - sig) * live
    r = torch.floor(w.to(cd) / s) + h + z
    inside = (r >= qmin) & (r <= qmax)
    gv = grad_w_hat.to(cd) * s * dh * inside
    t = 2.0 * h - 1.0
    # d/dh (1 - |t|^beta) = -2 beta |t|^(beta-1) sign(t)
    dreg = -2.0 * beta * t.abs().pow(beta - 1.0) * torch.sign(t) * dh
    gv = gv + grad_reg.to(cd) * dreg
    return gv.to(v.dtype)


def adaround_init_v(w: torch.Tensor, scale: torch.Tensor, axis: int | None) -> torch.Tensor:
    """V0 with h(V0) = frac(w/s): V0 = -log((zeta-gamma)/(r-gamma) - 1)."""
    s = channel_view(scale.to(torch.float32), w.dim(), axis)
    ws = w.to(torch.float32) / s
    r = ws - torch.floor(ws)
    return -torch.log((ZETA - GAMMA) / (r - GAMMA) - 1.0)

"""The zsq_fast operator library: schemas, and the pure-PyTorch fallback where no kernel is compiled.

The compiled extension (csrc/register_ops.cpp) defines these schemas with TORCH_LIBRARY and registers
CPU (and CUDA) kernels. Without it (or for CUDA in a CPU-only build) the same operators are defined
here and served by zsq_fast.ops.reference, so torch.ops.zsq_fast.* exists on every install and the
rest of the package never branches on the backend. A test keeps SCHEMAS equal to the C++ schemas.
"""
from __future__ import annotations

import torch

from . import reference as ref

SCHEMAS = {
    "channel_stats": "(Tensor x, Tensor? running=None, float running_count=0.) -> Tensor",
    "channel_stats_backward": "(Tensor x, Tensor mean, Tensor grad_mean, Tensor grad_var, float total_count, "
                              "Tensor? grad_scale=None) -> Tensor",
    "fake_quant": "(Tensor x, Tensor scale, Tensor zero_point, int qmin, int qmax, int axis) -> Tensor",
    "fake_quant_backward": "(Tensor grad, Tensor x, Tensor scale, Tensor zero_point, int qmin, int qmax, int axis, "
                           "bool need_scale_grad) -> (Tensor, Tensor)",
    "adaround": "(Tensor w, Tensor v, Tensor scale, Tensor zero_point, int qmin, int qmax, int axis, bool hard, "
                "float beta, bool compute_reg) -> (Tensor, Tensor)",
    "adaround_backward": "(Tensor grad_w_hat, Tensor grad_reg, Tensor w, Tensor v, Tensor scale, Tensor zero_point, "
                         "int qmin, int qmax, int axis, float beta) -> Tensor",
}

# Python-side registrations (fallback kernels, fakes, autograd, Python-only ops) live as long as this.
LIB = torch.library.Library("zsq_fast", "FRAGMENT")


def _axis(axis: int) -> int | None:
    return None if axis < 0 else axis


def _channel_stats(x, running=None, running_count=0.0):
    out = ref.channel_stats_forward(x)
    if running is None or running_count <= 0 or x.numel() == 0:
        return running.double().clone() if running is not None and running_count > 0 else out
    r = running.double()
    return torch.stack(ref.chan_merge(running_count, r[0], r[1], float(x.numel() // x.shape[1]), out[0], out[1]))


def _channel_stats_backward(x, mean, grad_mean, grad_var, total_count, grad_scale=None):
    if grad_scale is not None:
        cd = ref.compute_dtype(x.dtype)
        s = grad_scale.reshape(()).to(cd)
        grad_mean, grad_var = grad_mean.to(cd) * s, grad_var.to(cd) * s
    return ref.channel_stats_backward(x, mean, grad_mean, grad_var, total_count)


def _fake_quant(x, scale, zero_point, qmin, qmax, axis):
    return ref.fake_quant_forward(x, scale, zero_point, qmin, qmax, _axis(axis))


def _fake_quant_backward(grad, x, scale, zero_point, qmin, qmax, axis, need_scale_grad):
    gx, gs = ref.fake_quant_backward(grad, x, scale, zero_point, qmin, qmax, _axis(axis), need_scale_grad)
    return gx, gs.reshape(scale.shape) if need_scale_grad else scale.new_empty(0)


def _adaround(w, v, scale, zero_point, qmin, qmax, axis, hard, beta, compute_reg):
    return ref.adaround_forward(w, v, scale, zero_point, qmin, qmax, _axis(axis), hard, beta, compute_reg)


def _adaround_backward(grad_w_hat, grad_reg, w, v, scale, zero_point, qmin, qmax, axis, beta):
    g_reg = grad_reg.reshape(()).to(ref.compute_dtype(w.dtype))
    return ref.adaround_backward(grad_w_hat, g_reg, w, v, scale, zero_point, qmin, qmax, _axis(axis), beta)


REFERENCE_KERNELS = {
    "channel_stats": _channel_stats,
    "channel_stats_backward": _channel_stats_backward,
    "fake_quant": _fake_quant,
    "fake_quant_backward": _fake_quant_backward,
    "adaround": _adaround,
    "adaround_backward": _adaround_backward,
}


def _defined(name: str) -> bool:
    try:
        getattr(torch.ops.zsq_fast, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def install(cpu_kernels: bool, cuda_kernels: bool) -> None:
    """Define whatever the extension did not, and serve the devices it has no kernel for with the references."""
    for name, schema in SCHEMAS.items():
        if not _defined(name):
            LIB.define(name + schema)
        for device, compiled in (("CPU", cpu_kernels), ("CUDA", cuda_kernels)):
            if not compiled:
                LIB.impl(name, REFERENCE_KERNELS[name], device)

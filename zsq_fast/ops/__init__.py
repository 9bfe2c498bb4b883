"""Kernels' Python faces. Each op validates its arguments, dispatches to zsq_fast._C on the
devices it was built for and to the pure-PyTorch reference (zsq_fast.ops.reference) otherwise."""
from ._backend import backend, has_cpu_kernels, has_cuda_kernels
from .adaround import GAMMA, ZETA, adaround_init_v, adaround_quantize, rectified_sigmoid
from .channel_stats import ChannelStats, channel_mean_var, channel_stats, channel_stats_backward, inject_stats_grad
from .checks import quant_range
from .fake_quant import fake_quant, fake_quantize, round_pow2

__all__ = [
    "backend", "has_cpu_kernels", "has_cuda_kernels",
    "ChannelStats", "channel_stats", "channel_mean_var", "channel_stats_backward", "inject_stats_grad",
    "fake_quant", "fake_quantize", "round_pow2", "quant_range",
    "adaround_quantize", "adaround_init_v", "rectified_sigmoid", "ZETA", "GAMMA",
]

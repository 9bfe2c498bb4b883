"""Kernels' Python faces. The kernels are registered operators (torch.ops.zsq_fast.*): the compiled
extension serves the devices it was built for, zsq_fast.ops.reference the others. Each face validates
its arguments (shapes and dtypes; values only at setup or under set_value_checks) and calls the op."""
from ._backend import backend, has_cpu_kernels, has_cuda_kernels
from .adaround import GAMMA, ZETA, adaround_init_v, adaround_quantize, rectified_sigmoid
from .channel_stats import ChannelStats, channel_mean_var, channel_stats, channel_stats_backward, inject_stats_grad
from .checks import quant_range, set_value_checks, validate_scale, validate_zero_point, value_checks
from .fake_quant import fake_quant, fake_quantize, round_pow2

__all__ = [
    "backend", "has_cpu_kernels", "has_cuda_kernels",
    "ChannelStats", "channel_stats", "channel_mean_var", "channel_stats_backward", "inject_stats_grad",
    "fake_quant", "fake_quantize", "round_pow2", "quant_range",
    "set_value_checks", "value_checks", "validate_scale", "validate_zero_point",
    "adaround_quantize", "adaround_init_v", "rectified_sigmoid", "ZETA", "GAMMA",
]

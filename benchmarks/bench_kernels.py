"""Fused kernels vs their PyTorch composites, forward + backward, on ResNet-18 (224x224) and
CIFAR ResNet-20 (32x32) shapes.

    pytest benchmarks/bench_kernels.py                 # pytest-benchmark; extra_info: bytes, GB/s
    python benchmarks/bench_kernels.py --table         # both side by side, a markdown table

Runs on CUDA when available, else on CPU with smaller batches (CPU_BATCH) so a full run takes
a few minutes. Bytes moved count each op's unavoidable traffic (read inputs, write outputs,
forward and backward), the same for ours and the composite, so GB/s compares like with like.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zsq_fast import ops  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GPU_BATCH = {"resnet18": 128, "cifar": 128}
CPU_BATCH = {"resnet18": 4, "cifar": 32}
BATCH = GPU_BATCH if DEVICE == "cuda" else CPU_BATCH

# (name, per-sample activation shape or weight shape)
ACTIVATIONS = [("resnet18", (64, 112, 112)), ("resnet18", (64, 56, 56)), ("resnet18", (512, 7, 7)),
               ("cifar", (16, 32, 32)), ("cifar", (64, 8, 8))]
WEIGHTS = [("resnet18", (512, 512, 3, 3)), ("resnet18", (64, 3, 7, 7)), ("cifar", (64, 64, 3, 3)),
           ("cifar", (16, 3, 3, 3))]
BITS = 4
QMIN, QMAX = ops.quant_range(BITS, True)


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- op 1: channel statistics
def _stats_case(shape):
    torch.manual_seed(0)
    x = torch.randn(shape, device=DEVICE, requires_grad=True)
    gm, gv = torch.randn(shape[1], device=DEVICE), torch.randn(shape[1], device=DEVICE)

    def ours():
        m, v = ops.channel_mean_var(x)
        torch.autograd.backward((m, v), (gm, gv))

    def composite():
        v, m = torch.var_mean(x, [d for d in range(x.dim()) if d != 1], unbiased=False)
        torch.autograd.backward((m, v), (gm, gv))

    return ours, composite, 3 * x.numel() * x.element_size()  # fwd: read x; bwd: read x, write dx


# ---------------------------------------------------------------- op 2: fake quantization (LSQ)
def _fake_quant_case(shape, axis):
    torch.manual_seed(0)
    x = torch.randn(shape, device=DEVICE, requires_grad=True)
    n = 1 if axis is None else shape[axis]
    scale = torch.full((n,), 0.1, device=DEVICE, requires_grad=True)
    zero = torch.zeros(n, device=DEVICE)
    g = torch.randn_like(x)

    def ours():
        torch.autograd.backward(ops.fake_quant(x, scale, zero, QMIN, QMAX, axis), g)

    def composite():  # ATen's fused learnable (LSQ) fake quantization
        if axis is None:
            y = torch._fake_quantize_learnable_per_tensor_affine(x, scale, zero, QMIN, QMAX, 1.0)
        else:
            y = torch._fake_quantize_learnable_per_channel_affine(x, scale, zero, axis, QMIN, QMAX, 1.0)
        torch.autograd.backward(y, g)

    return ours, composite, 5 * x.numel() * x.element_size()  # fwd: x -> y; bwd: g, x -> gx


# ---------------------------------------------------------------- op 3: AdaRound
def _adaround_case(shape):
    torch.manual_seed(0)
    w = torch.randn(shape, device=DEVICE) * 0.05
    scale = w.abs().amax((1, 2, 3)) / QMAX
    v = ops.adaround_init_v(w, scale, 0).requires_grad_(True)
    g = torch.randn_like(w)
    lam = 0.01
    s = scale[:, None, None, None]

    def ours():
        w_hat, reg = ops.adaround_quantize(w, v, scale, bits=BITS, axis=0, beta=2.0)
        ((w_hat * g).sum() + lam * reg).backward()

    def composite():
        h = torch.clamp(torch.sigmoid(v) * (ops.ZETA - ops.GAMMA) + ops.GAMMA, 0, 1)
        w_hat = s * torch.clamp(torch.floor(w / s) + h, QMIN, QMAX)
        reg = (1 - (2 * h - 1).abs().pow(2.0)).sum()
        ((w_hat * g).sum() + lam * reg).backward()

    # fwd: w, v -> w_hat; bwd: g, w, v -> grad_v (the loss' own w_hat * g product is not counted)
    return ours, composite, 7 * w.numel() * w.element_size()


def cases():
    """(op, shape label, (ours, composite, bytes) factory) for every benchmarked configuration."""
    out = []
    for net, per_sample in ACTIVATIONS:
        shape = (BATCH[net],) + per_sample
        out.append(("channel_stats", shape, lambda shape=shape: _stats_case(shape)))
        out.append(("fake_quant per-tensor", shape, lambda shape=shape: _fake_quant_case(shape, None)))
    for net, shape in WEIGHTS:
        out.append(("fake_quant per-channel", shape, lambda shape=shape: _fake_quant_case(shape, 0)))
        out.append(("adaround", shape, lambda shape=shape: _adaround_case(shape)))
    return out


def _time(fn, repeat):
    fn()  # warm up (allocations, first-call dispatch)
    _sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def table(repeat: int = 7) -> str:
    rows = [f"Device: {DEVICE} ({torch.cuda.get_device_name() if DEVICE == 'cuda' else f'{torch.get_num_threads()} threads'}), "
            f"batch {BATCH}, median of {repeat}, forward + backward, fp32, backend {ops.backend()['fake_quant'][DEVICE]}",
            "",
            "| op | shape | ours ms | composite ms | ours/composite | ours GB/s | composite GB/s |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for op, shape, make in cases():
        ours, composite, nbytes = make()
        t_ours, t_comp = _time(ours, repeat), _time(composite, repeat)
        rows.append(f"| {op} | {tuple(shape)} | {t_ours * 1e3:.2f} | {t_comp * 1e3:.2f} | {t_ours / t_comp:.2f} | "
                    f"{nbytes / t_ours / 1e9:.1f} | {nbytes / t_comp / 1e9:.1f} |")
    return "\n".join(rows)


# ---------------------------------------------------------------- pytest-benchmark entry
try:
    import pytest
except ImportError:  # plain `python bench_kernels.py --table` needs no pytest
    pytest = None

if pytest is not None:
    _CASES = cases()

    @pytest.mark.parametrize("impl", ["ours", "composite"])
    @pytest.mark.parametrize("case", _CASES, ids=[f"{op}-{'x'.join(map(str, s))}" for op, s, _ in _CASES])
    def test_kernel(benchmark, case, impl):
        op, shape, make = case
        ours, composite, nbytes = make()
        fn = ours if impl == "ours" else composite
        benchmark.extra_info.update(op=op, shape=list(shape), device=DEVICE, bytes_moved=nbytes)
        benchmark.pedantic(lambda: (fn(), _sync()), rounds=5, iterations=1, warmup_rounds=1)
        benchmark.extra_info["GB/s"] = nbytes / benchmark.stats.stats.median / 1e9


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="print ours vs composite as a markdown table")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    if not args.table:
        parser.error("use --table, or run it with pytest for pytest-benchmark")
    print(table(args.repeat))

"""Fused kernels vs their PyTorch composites, forward + backward, on ResNet-18 (224x224), EfficientNet-Lite0
(224x224) and CIFAR ResNet-20 (32x32) shapes.

    pytest benchmarks/bench_kernels.py                 # pytest-benchmark; extra_info: bytes, GB/s
    python benchmarks/bench_kernels.py --table         # both side by side, a markdown table
    python benchmarks/bench_kernels.py --table --nets resnet18,efficientnet_lite0 --out k.md
                                                       # some networks; k.md is rewritten after every row

Runs on CUDA when available (timed with CUDA events), else on CPU with smaller batches (CPU_BATCH)
so a full run takes a few minutes; `--threads 1` gives the single-thread CPU figures. Bytes moved count each op's unavoidable traffic (read inputs, write outputs,
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
GPU_BATCH = {"resnet18": 128, "efficientnet_lite0": 128, "cifar": 128, "cifar_chunk1024": 1024}
CPU_BATCH = {"resnet18": 4, "efficientnet_lite0": 4, "cifar": 32, "cifar_chunk1024": 64}
BATCH = GPU_BATCH if DEVICE == "cuda" else CPU_BATCH

# (name, per-sample activation shape or weight shape)
# EfficientNet-Lite0: the stem's output, the widest expansion (block 2 at 112 px), a mid and the last stage;
# weights: a depthwise 3x3 and 5x5, the widest pointwise conv and the head
ACTIVATIONS = [("resnet18", (64, 112, 112)), ("resnet18", (64, 56, 56)), ("resnet18", (512, 7, 7)),
               ("efficientnet_lite0", (32, 112, 112)), ("efficientnet_lite0", (96, 112, 112)),
               ("efficientnet_lite0", (240, 28, 28)), ("efficientnet_lite0", (1152, 7, 7)),
               ("cifar", (16, 32, 32)), ("cifar", (64, 8, 8)), ("cifar_chunk1024", (16, 32, 32)),
               ("cifar_chunk1024", (64, 8, 8))]
WEIGHTS = [("resnet18", (512, 512, 3, 3)), ("resnet18", (64, 3, 7, 7)),
           ("efficientnet_lite0", (96, 1, 3, 3)), ("efficientnet_lite0", (672, 1, 5, 5)),
           ("efficientnet_lite0", (1152, 192, 1, 1)), ("efficientnet_lite0", (1280, 320, 1, 1)),
           ("cifar", (64, 64, 3, 3)), ("cifar", (16, 3, 3, 3))]
BITS = 4
QMIN, QMAX = ops.quant_range(BITS, True)


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


# Each case gives (forward, forward + backward) callables for ours and the composite, and the bytes
# each moves. The timed callables reset .grad first, so no gradient accumulation kernel is timed.
def _fresh(*ts):
    for t in ts:
        t.grad = None


# ---------------------------------------------------------------- op 1: channel statistics
def _stats_case(shape):
    torch.manual_seed(0)
    x = torch.randn(shape, device=DEVICE, requires_grad=True)
    gm, gv = torch.randn(shape[1], device=DEVICE), torch.randn(shape[1], device=DEVICE)
    dims = [d for d in range(x.dim()) if d != 1]

    def ours_fwd():
        with torch.no_grad():
            ops.channel_stats(x)

    def ours():
        _fresh(x)
        m, v = ops.channel_mean_var(x)
        torch.autograd.backward((m, v), (gm, gv))

    def comp_fwd():
        with torch.no_grad():
            torch.var_mean(x, dims, unbiased=False)

    def composite():
        _fresh(x)
        v, m = torch.var_mean(x, dims, unbiased=False)
        torch.autograd.backward((m, v), (gm, gv))

    n = x.numel() * x.element_size()
    return ours_fwd, comp_fwd, ours, composite, n, 3 * n  # fwd: read x; bwd: read x, write dx


# ---------------------------------------------------------------- op 2: fake quantization (LSQ)
def _fake_quant_case(shape, axis):
    torch.manual_seed(0)
    x = torch.randn(shape, device=DEVICE, requires_grad=True)
    n = 1 if axis is None else shape[axis]
    scale = torch.full((n,), 0.1, device=DEVICE, requires_grad=True)
    zero = torch.zeros(n, device=DEVICE)
    g = torch.randn_like(x)

    def ours_fwd():
        with torch.no_grad():
            ops.fake_quant(x, scale, zero, QMIN, QMAX, axis)

    def ours():
        _fresh(x, scale)
        torch.autograd.backward(ops.fake_quant(x, scale, zero, QMIN, QMAX, axis), g)

    def _aten(inp):  # ATen's fused learnable (LSQ) fake quantization
        if axis is None:
            return torch._fake_quantize_learnable_per_tensor_affine(inp, scale, zero, QMIN, QMAX, 1.0)
        return torch._fake_quantize_learnable_per_channel_affine(inp, scale, zero, axis, QMIN, QMAX, 1.0)

    def comp_fwd():
        with torch.no_grad():
            _aten(x)

    def composite():
        _fresh(x, scale)
        torch.autograd.backward(_aten(x), g)

    b = x.numel() * x.element_size()
    return ours_fwd, comp_fwd, ours, composite, 2 * b, 5 * b  # fwd: x -> y; bwd: g, x -> gx


# ---------------------------------------------------------------- op 3: AdaRound
def _adaround_case(shape):
    torch.manual_seed(0)
    w = torch.randn(shape, device=DEVICE) * 0.05
    scale = w.abs().amax((1, 2, 3)) / QMAX
    v = ops.adaround_init_v(w, scale, 0).requires_grad_(True)
    g = torch.randn_like(w)
    lam = 0.01
    s = scale[:, None, None, None]
    beta = 7.3  # mid-anneal: a non-integer exponent, the general (pow) path

    def ours_fwd():
        with torch.no_grad():
            ops.adaround_quantize(w, v, scale, bits=BITS, axis=0, beta=beta)

    def ours():
        _fresh(v)
        w_hat, reg = ops.adaround_quantize(w, v, scale, bits=BITS, axis=0, beta=beta)
        ((w_hat * g).sum() + lam * reg).backward()

    def _eager():
        h = torch.clamp(torch.sigmoid(v) * (ops.ZETA - ops.GAMMA) + ops.GAMMA, 0, 1)
        w_hat = s * torch.clamp(torch.floor(w / s) + h, QMIN, QMAX)
        reg = (1 - (2 * h - 1).abs().pow(beta)).sum()
        return w_hat, reg

    def comp_fwd():
        with torch.no_grad():
            _eager()

    def composite():
        _fresh(v)
        w_hat, reg = _eager()
        ((w_hat * g).sum() + lam * reg).backward()

    b = w.numel() * w.element_size()
    # fwd: w, v -> w_hat; bwd: g, w, v -> grad_v (the loss' own w_hat * g product is not counted)
    return ours_fwd, comp_fwd, ours, composite, 3 * b, 7 * b


def _copy_case(shape):
    x = torch.randn(shape, device=DEVICE)
    return (lambda: x.clone()), 2 * x.numel() * x.element_size()


def cases(nets=None):
    """(op, shape label, factory of the case's callables and bytes) for every benchmarked configuration
    (nets: of these networks only)."""
    out = []
    for net, per_sample in ACTIVATIONS:
        if nets is not None and net not in nets:
            continue
        shape = (BATCH[net],) + per_sample
        out.append(("channel_stats", shape, lambda shape=shape: _stats_case(shape)))
        out.append(("fake_quant per-tensor", shape, lambda shape=shape: _fake_quant_case(shape, None)))
    for net, shape in WEIGHTS:
        if nets is not None and net not in nets:
            continue
        out.append(("fake_quant per-channel", shape, lambda shape=shape: _fake_quant_case(shape, 0)))
        out.append(("adaround", shape, lambda shape=shape: _adaround_case(shape)))
    return out


def _time(fn, repeat):
    """Median seconds of fn: CUDA events on a GPU, perf_counter on the CPU."""
    fn()  # warm up (allocations, first-call dispatch)
    _sync()
    times = []
    for _ in range(repeat):
        if DEVICE == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def table(repeat: int = 7, out: str | None = None, nets=None) -> str:
    """The markdown table; with `out`, the file is rewritten after every row (a run cut short keeps its rows).
    nets: only the cases of these networks (ACTIVATIONS / WEIGHTS names)."""
    where = torch.cuda.get_device_name() if DEVICE == "cuda" else f"{torch.get_num_threads()} threads"
    rows = [f"Device: {DEVICE} ({where}), batch {BATCH}, median of {repeat}, fp32, "
            f"backend {ops.backend()['fake_quant'][DEVICE]}. fwd: forward only (no autograd); fwd+bwd: forward "
            "and backward with autograd. copy GB/s: x.clone() of the same tensor, the bandwidth ceiling; "
            "% of copy: ours GB/s over it (issue 31's goal: >= 85 % for the statistics and fake-quant kernels).",
            "",
            "| op | shape | fwd ours ms | fwd composite ms | fwd+bwd ours ms | fwd+bwd composite ms | "
            "composite/ours (fwd+bwd) | ours GB/s fwd | ours GB/s fwd+bwd | copy GB/s | % of copy fwd | "
            "% of copy fwd+bwd |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for op, shape, make in cases(nets):
        ours_fwd, comp_fwd, ours, composite, b_fwd, b_all = make()
        copy, b_copy = _copy_case(shape)
        tf, tcf = _time(ours_fwd, repeat), _time(comp_fwd, repeat)
        t, tc = _time(ours, repeat), _time(composite, repeat)
        tcopy = _time(copy, repeat)
        bw_f, bw, bw_copy = b_fwd / tf / 1e9, b_all / t / 1e9, b_copy / tcopy / 1e9
        rows.append(f"| {op} | {tuple(shape)} | {tf * 1e3:.3f} | {tcf * 1e3:.3f} | {t * 1e3:.3f} | {tc * 1e3:.3f} | "
                    f"{tc / t:.2f} | {bw_f:.1f} | {bw:.1f} | {bw_copy:.1f} | {100 * bw_f / bw_copy:.0f} | "
                    f"{100 * bw / bw_copy:.0f} |")
        del ours_fwd, comp_fwd, ours, composite, copy  # free the case's tensors before the next one
        if out:
            Path(out).write_text("\n".join(rows) + "\n")
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
        _, _, ours, composite, _, nbytes = make()
        fn = ours if impl == "ours" else composite
        benchmark.extra_info.update(op=op, shape=list(shape), device=DEVICE, bytes_moved=nbytes)
        benchmark.pedantic(lambda: (fn(), _sync()), rounds=5, iterations=1, warmup_rounds=1)
        benchmark.extra_info["GB/s"] = nbytes / benchmark.stats.stats.median / 1e9


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="print ours vs composite as a markdown table")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a dry run of the script")
    parser.add_argument("--out", help="also write the table to this file (rewritten after every row)")
    parser.add_argument("--nets", help="comma list of networks to run (default all): "
                        + ",".join(sorted(GPU_BATCH)))
    args = parser.parse_args()
    if not args.table:
        parser.error("use --table, or run it with pytest for pytest-benchmark")
    if args.threads:
        torch.set_num_threads(args.threads)
    nets = None if not args.nets else set(args.nets.split(","))
    if nets is not None and not nets <= set(GPU_BATCH):
        parser.error(f"--nets: unknown {sorted(nets - set(GPU_BATCH))}")
    if args.quick:  # per network its first activation (at 8x8, batch 2) and its first weight: every code path, fast
        BATCH = {net: 2 for net in GPU_BATCH}
        first_act = {net: (shape[0], 8, 8) for net, shape in reversed(ACTIVATIONS)}
        first_w = {net: shape for net, shape in reversed(WEIGHTS)}
        ACTIVATIONS[:] = list(first_act.items())
        WEIGHTS[:] = [(net, first_w[net]) for net in first_w if net in ("cifar", "efficientnet_lite0")]
    text = table(args.repeat, args.out, nets)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")

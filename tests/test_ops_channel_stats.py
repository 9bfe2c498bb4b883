"""Op 1 (channel statistics): kernels vs zsq_fast.ops.reference, chunk merging, injected gradients."""
import pytest
import torch
from conftest import cuda_only

from zsq_fast import ops
from zsq_fast.ops import reference as ref

DEVICES = ["cpu", pytest.param("cuda", marks=cuda_only)]
# fp16/bf16 inputs are exact in fp64; their stats differ only by summation order
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}


def _layouts(x):
    yield "contiguous", x
    if x.dim() == 4:
        yield "channels_last", x.to(memory_format=torch.channels_last)
    yield "permuted_dense", x.transpose(0, -1).contiguous().transpose(0, -1)
    yield "strided", torch.stack([x, x], -1)[..., 0]  # not dense: made contiguous


def _stats_close(got, want, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(got[0], want[0], rtol=tol, atol=tol)
    torch.testing.assert_close(got[1], want[1], rtol=tol, atol=tol * max(1.0, float(want[1].abs().max())))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 5, 6, 7), (1, 1, 3, 3), (3, 1, 2, 2), (2, 3), (5, 4, 9), (2, 40, 3, 3)])
def test_forward_matches_reference(device, dtype, shape):
    torch.manual_seed(0)
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 1).to(dtype).to(device)
    for name, xl in _layouts(x):
        got = torch.ops.zsq_fast.channel_stats(xl)
        assert got.dtype == torch.float64 and got.shape == (2, shape[1]), name
        _stats_close(got, ref.channel_stats_forward(xl), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_forward_empty_chunk_and_large_mean(device):
    x = torch.empty(0, 3, 4, 4, device=device)
    assert torch.equal(torch.ops.zsq_fast.channel_stats(x), torch.zeros(2, 3, dtype=torch.float64, device=device))
    torch.manual_seed(1)
    # mean 1e4, std 1e-2: raw sums of squares would cancel catastrophically in fp32
    x = (1e4 + 1e-2 * torch.randn(16, 3, 8, 8, dtype=torch.float64)).float().to(device)
    want = ref.channel_stats_forward(x)
    for _, xl in _layouts(x):
        got = torch.ops.zsq_fast.channel_stats(xl)
        torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_forward_non_finite_propagates(device):
    x = torch.randn(2, 3, 4, 4, device=device)
    x[0, 1, 2, 2] = float("nan")
    x[1, 2, 0, 1] = float("inf")
    got = torch.ops.zsq_fast.channel_stats(x)
    assert torch.isfinite(got[:, 0]).all()
    assert torch.isnan(got[:, 1]).all() and not torch.isfinite(got[:, 2]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("splits", [[16], [5, 11], [1, 1, 7, 7], [0, 9, 0, 7]])
def test_chunked_merge_equals_one_shot(device, splits):
    torch.manual_seed(2)
    for loc, std, rtol in ((0.0, 1.0, 1e-10), (1e4, 1e-2, 1e-6)):
        x = (loc + std * torch.randn(16, 6, 5, 5, dtype=torch.float64)).float().to(device)
        acc = ops.ChannelStats.empty(6, device)
        for chunk in torch.split(x, splits) if sum(splits) == 16 else _split(x, splits):
            acc = acc.merge(ops.channel_stats(chunk))
        want = ref.channel_stats_forward(x)
        assert acc.count == 16 * 25
        torch.testing.assert_close(acc.mean, want[0], rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(acc.m2, want[1], rtol=rtol, atol=0)
        torch.testing.assert_close(acc.var, want[1] / acc.count, rtol=rtol, atol=0)


def _split(x, sizes):
    out, start = [], 0
    for n in sizes:
        out.append(x[start:start + n])
        start += n
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_backward_matches_reference(device, dtype, channels_last):
    torch.manual_seed(3)
    cd = ref.compute_dtype(dtype)
    x = torch.randn(3, 5, 4, 6, dtype=dtype, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    mean, gm, gv = (torch.randn(5, dtype=cd, device=device) for _ in range(3))
    want = ref.channel_stats_backward(x, mean, gm, gv, 1000.0)
    got = ops.channel_stats_backward(x, mean, gm, gv, 1000.0)
    assert got.dtype == dtype and got.shape == x.shape
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last or not channels_last
    # Bit equality is promised on the CPU (same operation order, no contraction). On CUDA nvcc
    # contracts a + b (x - mean) into one FMA, which rounds once instead of twice: a difference of
    # at most an ulp or two of the larger term, so the CUDA tolerance is relative to that term.
    if dtype in (torch.float64, torch.float32):
        eps = torch.finfo(dtype).eps
        scale = float((gm.abs().max() + 2 * gv.abs().max() * (x.double().abs().max() + mean.abs().max())) / 1000.0)
        rtol, atol = (0.0, 0.0) if device == "cpu" else (4 * eps, 4 * eps * scale)
    else:
        rtol, atol = 1e-2, 1e-4
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    # the registered operator itself (the kernel, or the reference in a build without one)
    direct = torch.ops.zsq_fast.channel_stats_backward(x, mean, gm, gv, 1000.0)
    assert direct.stride() == x.stride()
    torch.testing.assert_close(direct, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_channel_mean_var_gradcheck(device, channels_last):
    torch.manual_seed(4)
    x = torch.randn(3, 4, 3, 2, dtype=torch.float64, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    mean, var = ops.channel_mean_var(x)
    torch.testing.assert_close(mean, x.mean((0, 2, 3)))
    torch.testing.assert_close(var, x.var((0, 2, 3), unbiased=False))
    assert torch.autograd.gradcheck(lambda t: ops.channel_mean_var(t), (x,))
    assert torch.autograd.gradcheck(lambda t: ops.channel_mean_var(t)[1].sum(), (x,))  # g_mean is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channel_mean_var_grad_matches_autograd(device, dtype):
    torch.manual_seed(5)
    x = torch.randn(8, 6, 5, 5, dtype=dtype, device=device, requires_grad=True)
    target_m, target_v = torch.randn(6, dtype=dtype, device=device), torch.rand(6, dtype=dtype, device=device)
    m, v = ops.channel_mean_var(x)
    (gx,) = torch.autograd.grad((m - target_m).square().sum() + (v - target_v).square().sum(), x)
    x2 = x.detach().clone().requires_grad_(True)
    v2, m2 = torch.var_mean(x2, (0, 2, 3), unbiased=False)
    (gx2,) = torch.autograd.grad((m2 - target_m).square().sum() + (v2 - target_v).square().sum(), x2)
    torch.testing.assert_close(gx, gx2, rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=1e-6)


def _bn_loss(mean, var, target_m, target_v):
    return (mean - target_m).square().sum() + (var.sqrt() - target_v.sqrt()).square().sum()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_injected_grad_equals_full_batch_autograd(device, channels_last):
    """Two-pass streamed BN loss (stats without grad, then inject_stats_grad per chunk) gives the
    same input gradient as autograd through the whole concatenated batch."""
    torch.manual_seed(6)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1).double().to(device)
    images = torch.randn(10, 3, 6, 6, dtype=torch.float64, device=device)
    if channels_last:
        images = images.to(memory_format=torch.channels_last)
        conv = conv.to(memory_format=torch.channels_last)
    target_m, target_v = torch.randn(4, dtype=torch.float64, device=device), torch.rand(4, dtype=torch.float64,
                                                                                        device=device) + 0.5
    full = images.clone().requires_grad_(True)
    act = conv(full)
    var, mean = torch.var_mean(act, (0, 2, 3), unbiased=False)
    (want,) = torch.autograd.grad(_bn_loss(mean, var, target_m, target_v), full)

    chunks = [images[:3], images[3:4], images[4:]]
    with torch.no_grad():
        stats = ops.ChannelStats.empty(4, device)
        for ch in chunks:
            stats = stats.merge(ops.channel_stats(conv(ch)))
    m = stats.mean.clone().requires_grad_(True)
    v = stats.var.clone().requires_grad_(True)
    g_mean, g_var = torch.autograd.grad(_bn_loss(m, v, target_m, target_v), (m, v))
    got = []
    for ch in chunks:
        ch = ch.clone().requires_grad_(True)
        zero = ops.inject_stats_grad(conv(ch), stats.mean, g_mean, g_var, stats.count)
        assert float(zero.detach()) == 0.0
        (g,) = torch.autograd.grad(zero * 1.0, ch)
        got.append(g)
    torch.testing.assert_close(torch.cat(got), want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_inject_stats_grad_is_gradient_of_linearized_loss(device):
    torch.manual_seed(7)
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64, device=device, requires_grad=True)
    mean, gm, gv = (torch.randn(3, dtype=torch.float64, device=device) for _ in range(3))
    # inject_stats_grad is the gradient of the linear functional L(x) = sum_c gm[c] mean_c + gv[c] var_c
    # evaluated around a fixed mean: compare its x-gradient with autograd of that functional.
    (g,) = torch.autograd.grad(ops.inject_stats_grad(x, mean, gm, gv, 7.0), x)
    xd = x.detach().requires_grad_(True)
    lin = (gm[:, None, None] * xd / 7.0 + gv[:, None, None] * (xd - mean[:, None, None]).square() / 7.0).sum()
    (want,) = torch.autograd.grad(lin, xd)
    torch.testing.assert_close(g, want)
    torch.testing.assert_close(ops.channel_stats_backward(x.detach(), mean, gm, gv, 7.0), want)


def test_bad_arguments():
    with pytest.raises(TypeError, match="floating-point"):
        ops.channel_stats(torch.ones(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="shape"):
        ops.channel_stats(torch.ones(3))
    with pytest.raises(ValueError, match="non-empty"):
        ops.channel_mean_var(torch.ones(0, 3))
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="channels"):
        ops.inject_stats_grad(x, torch.zeros(2), torch.zeros(3), torch.zeros(3), 10)
    with pytest.raises(ValueError, match="total_count"):
        ops.inject_stats_grad(x, torch.zeros(3), torch.zeros(3), torch.zeros(3), 0)


@pytest.mark.skipif(not ops.has_cpu_kernels(), reason="the compiled operators' own argument checks "
                    "(csrc/register_ops.cpp); without the build the Python faces check the same arguments")
def test_direct_bad_arguments():
    with pytest.raises(TypeError, match="floating-point"):
        torch.ops.zsq_fast.channel_stats(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="N, C"):
        torch.ops.zsq_fast.channel_stats(torch.ones(3))
    with pytest.raises(ValueError, match="grad_var has 2 elements"):
        torch.ops.zsq_fast.channel_stats_backward(torch.ones(2, 3), torch.zeros(3), torch.zeros(3), torch.zeros(2), 4.0)
    with pytest.raises(ValueError, match="total_count"):
        torch.ops.zsq_fast.channel_stats_backward(torch.ones(2, 3), torch.zeros(3), torch.zeros(3), torch.zeros(3), 0.0)

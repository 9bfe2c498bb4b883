"""Op 2 (fake quantization, STE/LSQ gradients): kernels vs zsq_fast.ops.reference."""
import pytest
import torch
from conftest import cuda_only

from zsq_fast import ops
from zsq_fast.ops import reference as ref

DEVICES = ["cpu", pytest.param("cuda", marks=cuda_only)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _qparams(x, axis, qmin, qmax, device, zp=True):
    n = 1 if axis is None else x.shape[axis]
    scale = torch.rand(n, device=device) * 0.2 + 0.05
    zero = torch.randint(qmin // 2, qmax // 2 + 1, (n,), device=device).float() if zp else torch.zeros(n, device=device)
    return scale, zero


def _layouts(x):
    yield x
    if x.dim() == 4:
        yield x.to(memory_format=torch.channels_last)
        yield x.transpose(0, -1).contiguous().transpose(0, -1)  # dense, permuted
        yield torch.stack([x, x], -1)[..., 0]  # not dense: made contiguous


def _close(got, want, dtype):
    # fp16/bf16 outputs are rounded from identical fp32 values: exact; sums differ by order only
    torch.testing.assert_close(got, want, rtol=0, atol=0) if dtype != torch.float64 else torch.testing.assert_close(
        got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [None, 0, 1, 3])
def test_forward_backward_match_reference(device, dtype, axis):
    torch.manual_seed(0)
    qmin, qmax = -8, 7
    x0 = (torch.randn(3, 5, 4, 6, device=device) * 0.6).to(dtype)
    for x in _layouts(x0):
        scale, zero = _qparams(x, axis, qmin, qmax, device)
        xr = x.detach().clone().requires_grad_(True)
        sr = scale.clone().requires_grad_(True)
        out = ops.fake_quant(xr, sr, zero, qmin, qmax, axis)
        want = ref.fake_quant_forward(x, scale, zero, qmin, qmax, axis)
        _close(out, want, dtype)
        assert out.dtype == dtype
        if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
            assert out.stride() == x.stride()
        g = torch.randn_like(x)
        gx, gs = torch.autograd.grad(out, (xr, sr), g)
        wgx, wgs = ref.fake_quant_backward(g, x, scale, zero, qmin, qmax, axis)
        _close(gx, wgx, dtype)
        torch.testing.assert_close(gs, wgs, rtol=1e-5, atol=1e-5)
        # the registered operator itself (the kernel, or the reference in a build without one)
        ax = -1 if axis is None else axis
        _close(torch.ops.zsq_fast.fake_quant(x, scale, zero, qmin, qmax, ax), want, dtype)
        dgx, dgs = torch.ops.zsq_fast.fake_quant_backward(g, x, scale, zero, qmin, qmax, ax, True)
        _close(dgx, wgx, dtype)
        assert dgs.shape == scale.shape and dgs.dtype == scale.dtype
        torch.testing.assert_close(dgs, wgs, rtol=1e-5, atol=1e-5)
        dgx2, _ = torch.ops.zsq_fast.fake_quant_backward(g, x, scale, zero, qmin, qmax, ax, False)
        _close(dgx2, wgx, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,axis", [((1, 1, 1, 1), None), ((1, 1, 1, 1), 1), ((7,), 0), ((0, 3, 2, 2), 1),
                                        ((0, 3), None), ((4, 1, 3, 3), 1), ((2, 3), 1)])
def test_edge_shapes(device, shape, axis):
    torch.manual_seed(1)
    x = torch.randn(shape, device=device, requires_grad=True)
    scale, zero = _qparams(x, axis, -128, 127, device)
    scale.requires_grad_(True)
    out = ops.fake_quant(x, scale, zero, -128, 127, axis)
    torch.testing.assert_close(out, ref.fake_quant_forward(x.detach(), scale.detach(), zero, -128, 127, axis))
    gx, gs = torch.autograd.grad(out.sum(), (x, scale))
    wgx, wgs = ref.fake_quant_backward(torch.ones_like(x), x.detach(), scale.detach(), zero, -128, 127, axis)
    torch.testing.assert_close(gx, wgx)
    torch.testing.assert_close(gs, wgs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rounding_ties_clip_bounds_and_non_finite(device, dtype):
    s = 0.25
    k = torch.arange(-12, 12, dtype=dtype, device=device)
    ties = (k + 0.5) * s  # exactly on the rounding boundary: half to even
    x = torch.cat([ties, torch.tensor([-2.0, 1.75, 1.875, -2.375, 1e30, -1e30, 3e38, float("inf"), -float("inf"),
                                       float("nan"), 0.0, -0.0], dtype=dtype, device=device)])
    scale = torch.tensor([s], device=device)
    zero = torch.zeros(1, device=device)
    out = ops.fake_quant(x, scale, zero, -8, 7)
    want = ref.fake_quant_forward(x, scale, zero, -8, 7, None)
    torch.testing.assert_close(out, want, equal_nan=True)
    even = torch.round(ties / s)
    torch.testing.assert_close(out[:24], torch.clamp(even, -8, 7) * s)
    assert out[-3].isnan() and out[-5] == 7 * s and out[-4] == -8 * s  # inf clamps, NaN propagates
    xr = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(ops.fake_quant(xr, scale, zero, -8, 7), xr, torch.ones_like(x))
    # STE: 1 exactly where round(x/s) lands in [qmin, qmax] (1.75 -> 7 inside; 1.875 -> 7.5 -> 8 and -2.375 -> -9.5 -> -10 outside)
    assert gx[24] == 1 and gx[25] == 1 and gx[26] == 0 and gx[27] == 0 and gx[-3] == 0
    torch.testing.assert_close(gx, ref.fake_quant_backward(torch.ones_like(x), x, scale, zero, -8, 7, None)[0])


@pytest.mark.parametrize("device", DEVICES)
def test_scale_fp64_and_power_of_two(device):
    torch.manual_seed(2)
    x = torch.randn(4, 6, device=device)
    scale = (torch.rand(6, dtype=torch.float64, device=device) * 0.1 + 0.01).requires_grad_(True)
    out = ops.fake_quantize(x, scale, bits=4, axis=1)
    torch.testing.assert_close(out, ref.fake_quant_forward(x, scale.detach(), torch.zeros(6, device=device),
                                                           -8, 7, 1))
    (gs,) = torch.autograd.grad(out.sum(), scale)
    assert gs.dtype == torch.float64 and gs.shape == (6,)
    p2 = ops.fake_quantize(x, scale, bits=8, axis=1, power_of_two=True)
    s2 = torch.exp2(torch.round(torch.log2(scale.detach())))
    torch.testing.assert_close(p2, ref.fake_quant_forward(x, s2, torch.zeros(6, device=device), -128, 127, 1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("axis", [None, 1])
def test_gradients_against_formula_and_gradcheck(device, axis):
    """STE/LSQ grads of a step function: check them against the analytic formula, and use
    gradcheck on the scale where x/s stays away from rounding and clipping boundaries."""
    torch.manual_seed(3)
    qmin, qmax = -8, 7
    q = torch.randint(-10, 10, (3, 4, 2, 2), device=device).double()
    q[(q == qmin) | (q == qmax)] = 9  # torch.clamp's gradient is 0 at the bounds themselves, ours 1
    x = (q + torch.rand_like(q) * 0.6 - 0.3) * 0.1  # |frac(x/s)| <= 0.3 away from .5 ties, some clipped
    scale = torch.full((1 if axis is None else 4,), 0.1, dtype=torch.float64, device=device)
    zero = torch.zeros_like(scale, dtype=torch.float32)
    xr, sr = x.clone().requires_grad_(True), scale.clone().requires_grad_(True)
    g = torch.randn_like(x)
    gx, gs = torch.autograd.grad(ops.fake_quant(xr, sr, zero, qmin, qmax, axis), (xr, sr), g)
    sv = ref.channel_view(scale, 4, axis)
    r = torch.round(x / sv)
    inside = (r >= qmin) & (r <= qmax)
    torch.testing.assert_close(gx, g * inside)
    dsc = g * (torch.clamp(r, qmin, qmax) - inside * x / sv)
    torch.testing.assert_close(gs, dsc.sum() .reshape(1) if axis is None else dsc.sum((0, 2, 3)))
    # the same through autograd of the eager formula with a straight-through round
    xe, se = x.clone().requires_grad_(True), scale.clone().requires_grad_(True)
    sve = ref.channel_view(se, 4, axis)
    t = xe / sve
    t = torch.round(t).detach() + (t - t.detach())  # value exactly round(t), gradient 1
    gxe, gse = torch.autograd.grad((torch.clamp(t, qmin, qmax) * sve * g).sum(), (xe, se))
    torch.testing.assert_close(gx, gxe)
    torch.testing.assert_close(gs, gse)
    # where every x is clipped, x_hat = s * qmin/qmax is smooth in s and LSQ is its true gradient
    clipped = x.sign() * (12 + torch.rand_like(x)) * 0.1
    assert torch.autograd.gradcheck(lambda s: ops.fake_quant(clipped, s, zero, qmin, qmax, axis), (sr,))


def test_bad_arguments():
    x = torch.randn(2, 3)
    s = torch.tensor([0.1])
    with pytest.raises(ValueError, match="bits"):
        ops.fake_quantize(x, s, bits=0)
    with pytest.raises(ValueError, match="bits"):
        ops.fake_quantize(x, s, bits=33)
    with pytest.raises(TypeError, match="bits"):
        ops.fake_quantize(x, s, bits=4.0)
    with ops.value_checks(True):  # values are checked at setup, or on every call in debug mode
        with pytest.raises(ValueError, match="> 0"):
            ops.fake_quantize(x, torch.tensor([0.0]))
        with pytest.raises(ValueError, match="> 0"):
            ops.fake_quantize(x, torch.tensor([-1.0, 1.0, 1.0]), axis=1)
        with pytest.raises(ValueError, match="zero_point"):
            ops.fake_quantize(x, s, torch.tensor([0.5]))
    ops.fake_quantize(x, torch.tensor([0.0]))  # by default no per-call value check (it would sync a GPU)
    with pytest.raises(ValueError, match="out of range"):
        ops.fake_quantize(x, s, axis=2)
    with pytest.raises(ValueError, match="elements"):
        ops.fake_quantize(x, s.expand(2), axis=1)
    with pytest.raises(TypeError, match="floating-point"):
        ops.fake_quantize(torch.ones(2, 3, dtype=torch.int32), s)
    with pytest.raises(ValueError, match="qmin < qmax"):
        ops.fake_quant(x, s, None, 3, 3)


@pytest.mark.skipif(not ops.has_cpu_kernels(), reason="the compiled operators' own argument checks "
                    "(csrc/register_ops.cpp); without the build the Python faces check the same arguments")
def test_direct_bad_arguments():
    x, s, z = torch.randn(2, 3), torch.tensor([0.1]), torch.zeros(1)
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        torch.ops.zsq_fast.fake_quant(x, s, z, -8, 7, 2)
    with pytest.raises(ValueError, match="scale has 1 elements, expected 3"):
        torch.ops.zsq_fast.fake_quant(x, s, z, -8, 7, 1)
    with pytest.raises(TypeError, match="floating-point"):
        torch.ops.zsq_fast.fake_quant(x.int(), s, z, -8, 7, -1)
    with pytest.raises(ValueError, match="grad has shape"):
        torch.ops.zsq_fast.fake_quant_backward(torch.ones(3), x, s, z, -8, 7, -1, True)

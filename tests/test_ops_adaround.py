"""Op 3 (AdaRound soft rounding + regularizer): kernels vs zsq_fast.ops.reference."""
import pytest
import torch
from conftest import cuda_only

from zsq_fast import ops
from zsq_fast.ops import reference as ref

DEVICES = ["cpu", pytest.param("cuda", marks=cuda_only)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _setup(shape, axis, dtype, device, seed=0):
    torch.manual_seed(seed)
    w = (torch.randn(shape, device=device) * 0.3).to(dtype)
    n = 1 if axis is None else shape[axis]
    scale = torch.rand(n, device=device) * 0.05 + 0.02
    zero = torch.randint(-2, 3, (n,), device=device).float()
    v = (torch.randn(shape, device=device) * 3).to(dtype)  # some h clipped to 0 or 1
    return w, v, scale, zero


def _tol(dtype):
    return {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [0, None, 1])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_reference(device, dtype, axis, channels_last):
    w, v, scale, zero = _setup((6, 5, 3, 3), axis, dtype, device)
    if channels_last:
        w, v = w.to(memory_format=torch.channels_last), v.to(memory_format=torch.channels_last)
    qmin, qmax = -8, 7
    tol = _tol(dtype)
    for hard in (False, True):
        vr = v.detach().clone().requires_grad_(not hard)
        w_hat, reg = ops.adaround_quantize(w, vr, scale, zero, bits=4, axis=axis, hard=hard, beta=3.0)
        w_want, reg_want = ref.adaround_forward(w, v, scale, zero, qmin, qmax, axis, hard, 3.0, True)
        assert w_hat.dtype == dtype and reg.dtype == reg_want.dtype and reg.dim() == 0
        torch.testing.assert_close(w_hat, w_want, rtol=tol, atol=tol * 0.1)
        torch.testing.assert_close(reg, reg_want, rtol=1e-5, atol=1e-4)
        if hard:
            assert float(reg) == 0.0
            continue
        g = torch.randn_like(w)
        (gv,) = torch.autograd.grad((w_hat * g).sum() + 0.7 * reg, vr)
        want = ref.adaround_backward(g, torch.tensor(0.7, dtype=ref.compute_dtype(dtype), device=device),
                                     w, v, scale, zero, qmin, qmax, axis, 3.0)
        torch.testing.assert_close(gv, want, rtol=tol, atol=tol * 0.1)
        # the registered operator itself (the kernel, or the reference in a build without one)
        ax = -1 if axis is None else axis
        dw, dreg = torch.ops.zsq_fast.adaround(w, v, scale, zero, qmin, qmax, ax, False, 3.0, False)
        torch.testing.assert_close(dw, w_want, rtol=tol, atol=tol * 0.1)
        assert float(dreg) == 0.0
        assert dw.stride() == w.stride()
        dgv = torch.ops.zsq_fast.adaround_backward(g, torch.tensor(0.7, dtype=ref.compute_dtype(dtype), device=device), w, v, scale, zero, qmin, qmax, ax, 3.0)
        torch.testing.assert_close(dgv, want, rtol=tol, atol=tol * 0.1)


@pytest.mark.parametrize("device", DEVICES)
def test_init_v_reproduces_w_and_edge_shapes(device):
    for shape in [(1, 1, 1, 1), (4, 3, 3, 3), (10, 7), (0, 3)]:
        torch.manual_seed(1)
        w = torch.randn(shape, device=device) * 0.2
        scale = torch.full((max(shape[0], 1),) if shape[0] else (0,), 0.05, device=device)
        if shape[0] == 0:
            scale = torch.tensor([0.05], device=device)
            w_hat, reg = ops.adaround_quantize(w, torch.zeros_like(w), scale, bits=8, axis=None)
            assert w_hat.shape == shape and float(reg) == 0.0
            continue
        v0 = ops.adaround_init_v(w, scale, axis=0)
        w_hat, reg = ops.adaround_quantize(w, v0, scale, bits=8, axis=0)
        torch.testing.assert_close(w_hat, w, rtol=1e-5, atol=1e-6)
        _, reg_want = ref.adaround_forward(w, v0, scale, torch.zeros_like(scale), -128, 127, 0, False, 2.0, True)
        torch.testing.assert_close(reg, reg_want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("beta", [1.0, 2.0, 4.5])
def test_gradcheck_including_regularizer(device, beta):
    torch.manual_seed(2)
    # h strictly inside (0, 1) so the function is smooth in V; w/s away from integers
    w = (torch.randint(-5, 5, (4, 3, 2, 2), device=device).double() + 0.3) * 0.1
    v = (torch.rand(4, 3, 2, 2, dtype=torch.float64, device=device) * 3 - 1.5).requires_grad_(True)
    scale = torch.full((4,), 0.1, dtype=torch.float64, device=device)
    g = torch.randn_like(w)

    def f(vv):
        w_hat, reg = ops.adaround_quantize(w, vv, scale, bits=3, axis=0, beta=beta)
        return (w_hat * g).sum() + 0.3 * reg

    assert torch.autograd.gradcheck(f, (v,), atol=1e-6)
    # the regularizer alone and the data term alone
    assert torch.autograd.gradcheck(lambda vv: ops.adaround_quantize(w, vv, scale, bits=3, axis=0, beta=beta)[1],
                                    (v,), atol=1e-6)
    assert torch.autograd.gradcheck(lambda vv: ops.adaround_quantize(w, vv, scale, bits=3, axis=0,
                                                                     compute_reg=False)[0], (v,), atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_clipped_h_and_grid_edges_have_zero_data_grad(device):
    w = torch.tensor([[0.69, 0.0, -0.81, 0.31]], device=device, dtype=torch.float64)  # w/s: 6.9 -> floor 6; -8.1
    v = torch.tensor([[0.5, 10.0, -0.2, -10.0]], device=device, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([0.1], device=device, dtype=torch.float64)
    w_hat, _ = ops.adaround_quantize(w, v, scale, bits=4, axis=0, compute_reg=False)
    (gv,) = torch.autograd.grad(w_hat.sum(), v)
    # 0.69: floor 6 + h(0.5)=0.69 -> 6.69 inside; 0.0: h(10) clipped to 1 -> dh = 0; -0.81: floor -9 + h < -8
    # is clipped at qmin -> 0; 0.31: h(-10) clipped to 0 -> dh = 0
    assert gv[0, 0] > 0 and gv[0, 1] == 0 and gv[0, 2] == 0 and gv[0, 3] == 0
    torch.testing.assert_close(gv, ref.adaround_backward(torch.ones_like(w), torch.tensor(0.0, dtype=torch.float64,
                                                                                           device=device),
                                                         w, v.detach(), scale, torch.zeros(1, device=device),
                                                         -8, 7, 0, 2.0))


def test_bad_arguments():
    w, v, s = torch.randn(4, 3), torch.randn(4, 3), torch.full((4,), 0.1)
    with pytest.raises(ValueError, match="bits"):
        ops.adaround_quantize(w, v, s, bits=0)
    with pytest.raises(ValueError, match="bits"):
        ops.adaround_quantize(w, v, s, bits=33)
    with ops.value_checks(True), pytest.raises(ValueError, match="> 0"):  # values: at setup or in debug mode
        ops.adaround_quantize(w, v, -s, bits=4)
    with pytest.raises(ValueError, match="out of range"):
        ops.adaround_quantize(w, v, s, bits=4, axis=2)
    with pytest.raises(ValueError, match="shape"):
        ops.adaround_quantize(w, v[:2], s, bits=4)
    with pytest.raises(TypeError, match="dtype"):
        ops.adaround_quantize(w, v.double(), s, bits=4)
    with pytest.raises(TypeError, match="floating-point"):
        ops.adaround_quantize(w.int(), v, s, bits=4)
    with pytest.raises(ValueError, match="beta"):
        ops.adaround_quantize(w, v, s, bits=4, beta=0.5)


@pytest.mark.skipif(not ops.has_cpu_kernels(), reason="the compiled operators' own argument checks "
                    "(csrc/register_ops.cpp); without the build the Python faces check the same arguments")
def test_direct_bad_arguments():
    w, v, s, z = torch.randn(4, 3), torch.randn(4, 3), torch.full((4,), 0.1), torch.zeros(4)
    with pytest.raises(ValueError, match="axis 5 is out of range"):
        torch.ops.zsq_fast.adaround(w, v, s, z, -8, 7, 5, False, 2.0, True)
    with pytest.raises(TypeError, match="v has dtype"):
        torch.ops.zsq_fast.adaround(w, v.double(), s, z, -8, 7, 0, False, 2.0, True)
    with pytest.raises(ValueError, match="grad_reg must hold one element"):
        torch.ops.zsq_fast.adaround_backward(w, torch.zeros(2), w, v, s, z, -8, 7, 0, 2.0)
    with pytest.raises(ValueError, match="beta"):
        torch.ops.zsq_fast.adaround_backward(w, torch.zeros(()), w, v, s, z, -8, 7, 0, 0.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_floor_at_integers_and_huge_values(device, dtype):
    s = 0.25
    w = torch.tensor([-3 * s, 3 * s, -0.0, 0.0, 2.5 * s, -2.5 * s, 1e30, -1e30, 9e6 * s, -9e6 * s, 1.75, -1.75,
                      float("inf"), -float("inf")], dtype=dtype, device=device)[None]
    v = torch.linspace(-4, 4, w.numel(), dtype=dtype, device=device)[None]
    scale = torch.tensor([s], device=device)
    zero = torch.zeros(1, device=device)
    for hard in (False, True):
        w_hat, _ = ops.adaround_quantize(w, v, scale, zero, bits=16, axis=0, hard=hard)
        want, _ = ref.adaround_forward(w, v, scale, zero, -2 ** 15, 2 ** 15 - 1, 0, hard, 2.0, True)
        torch.testing.assert_close(w_hat, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("beta", [1.0, 1.5, 2.0, 7.3, 20.0])
def test_annealed_beta_matches_reference(device, beta):
    """The whole anneal range: the CPU float kernel computes |2h-1|^beta with its own branch-free
    exp/log (csrc/vec_math.h) except at beta = 1 and 2; compare with torch.pow in the reference."""
    w, v, scale, zero = _setup((64, 9, 3, 3), 0, torch.float32, device, seed=3)
    vr = v.clone().requires_grad_(True)
    w_hat, reg = ops.adaround_quantize(w, vr, scale, zero, bits=4, beta=beta)
    w_want, reg_want = ref.adaround_forward(w, v, scale, zero, -8, 7, 0, False, beta, True)
    torch.testing.assert_close(w_hat, w_want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(reg, reg_want, rtol=1e-5, atol=1e-3)
    g = torch.randn_like(w)
    (gv,) = torch.autograd.grad((w_hat * g).sum() + 0.3 * reg, vr)
    want = ref.adaround_backward(g, torch.tensor(0.3, device=device), w, v, scale, zero, -8, 7, 0, beta)
    torch.testing.assert_close(gv, want, rtol=2e-5, atol=1e-6)

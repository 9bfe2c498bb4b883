"""The registered operators (torch.ops.zsq_fast.*): schemas, opcheck, torch.compile, no host
synchronisation, determinism, and the edge cases the first GPU run would otherwise find."""
import pytest
import torch
from conftest import cuda_only
from torch.library import opcheck
from torch.utils._python_dispatch import TorchDispatchMode

from zsq_fast import ops
from zsq_fast.ops import reference as ref
from zsq_fast.ops._library import SCHEMAS

DEVICES = ["cpu", pytest.param("cuda", marks=cuda_only)]
OPS = torch.ops.zsq_fast


def test_schemas_match_the_compiled_library():
    for name, schema in SCHEMAS.items():
        op = getattr(OPS, name).default
        assert str(op._schema) == str(torch._C.parse_schema(f"zsq_fast::{name}{schema}")), name


def _layouts(x):
    yield x
    if x.dim() == 4:
        yield x.to(memory_format=torch.channels_last)
    yield torch.stack([x, x], -1)[..., 0]  # not dense


def _samples(device):
    """(op, args) covering dtypes, layouts, per-tensor/per-channel and the optional arguments."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.float32, grad=False):
        t = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(device)
        return t.requires_grad_(grad)

    for dtype in (torch.float32, torch.float64):
        for x in _layouts(rand(3, 4, 5, 6, dtype=dtype)):
            x = x.detach().requires_grad_(True)
            yield OPS.channel_stats.default, (x,)
            running = torch.stack([torch.randn(4, generator=g, dtype=torch.float64),
                                   torch.rand(4, generator=g, dtype=torch.float64) * 50]).to(device)
            yield OPS.channel_stats.default, (x, running, 37.0)
            cd = ref.compute_dtype(dtype)
            mean, gm, gv = (rand(4, dtype=torch.float64) for _ in range(3))
            yield OPS.channel_stats_backward.default, (x.detach(), mean, gm, gv, 1000.0)
            yield OPS.channel_stats_backward.default, (x.detach(), mean, gm, gv, 1000.0,
                                                      torch.tensor(512.0, device=device, dtype=cd))
            for axis in (-1, 1, 3):
                n = 1 if axis < 0 else x.shape[axis]
                scale = (torch.rand(n, generator=g) * 0.2 + 0.05).to(device).requires_grad_(True)
                zp = torch.randint(-3, 4, (n,), generator=g).float().to(device)
                yield OPS.fake_quant.default, (x, scale, zp, -8, 7, axis)
                yield OPS.fake_quant_backward.default, (torch.randn_like(x), x.detach(), scale.detach(), zp, -8, 7,
                                                        axis, True)
                yield OPS.fake_quant_backward.default, (torch.randn_like(x), x.detach(), scale.detach(), zp, -8, 7,
                                                        axis, False)
        for axis in (0, -1):
            w = rand(6, 5, 3, 3, dtype=dtype)
            v = rand(6, 5, 3, 3, dtype=dtype, grad=True)
            n = 1 if axis < 0 else 6
            scale = (torch.rand(n, generator=g) * 0.05 + 0.02).to(device)
            zp = torch.zeros(n, device=device)
            for hard in (False, True):
                yield OPS.adaround.default, (w, v, scale, zp, -8, 7, axis, hard, 3.0, True)
            yield OPS.adaround.default, (w, v, scale, zp, -8, 7, axis, False, 2.0, False)
            grad_reg = torch.tensor(0.3, dtype=ref.compute_dtype(dtype), device=device)
            yield OPS.adaround_backward.default, (torch.randn_like(w), grad_reg, w, v.detach(), scale, zp, -8, 7,
                                                  axis, 3.0)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_every_op(device):
    """Schema, fake (meta) kernel, autograd registration and AOT dispatch of every op on many inputs."""
    seen = set()
    for op, args in _samples(device):
        opcheck(op, args)
        seen.add(op.name())
    assert seen == {f"zsq_fast::{n}" for n in SCHEMAS}
    x = torch.randn(2, 3, 4, 4, device=device, requires_grad=True)
    opcheck(OPS.inject_stats_grad.default, (x, torch.zeros(3, device=device), torch.ones(3, device=device),
                                            torch.ones(3, device=device), 32.0))


def test_meta_tensors_get_shapes_from_the_fake_kernels():
    x = torch.empty(2, 3, 4, 4, device="meta").to(memory_format=torch.channels_last)
    out = OPS.fake_quant(x, torch.ones(1, device="meta"), torch.zeros(1, device="meta"), -8, 7, -1)
    assert out.device.type == "meta" and out.stride() == x.stride()
    assert OPS.channel_stats(x).shape == (2, 3)


# ---------------------------------------------------------------- no host synchronisation
class _ForbidHostSync(TorchDispatchMode):
    """Fails on any op that reads a tensor's value on the host (.item(), bool(t), nonzero ...)."""
    FORBIDDEN = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
                 torch.ops.aten.nonzero.default, torch.ops.aten.equal.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.FORBIDDEN:
            raise AssertionError(f"host synchronisation in an op call: {func}")
        return func(*args, **(kwargs or {}))


def _every_op_forward_and_backward(device):
    x = torch.randn(4, 3, 5, 5, device=device, requires_grad=True)
    s = torch.tensor([0.1], device=device, requires_grad=True)
    y = ops.fake_quantize(x, s, bits=4, power_of_two=True)
    w = torch.randn(6, 3, 3, 3, device=device)
    v = torch.randn(6, 3, 3, 3, device=device, requires_grad=True)
    w_hat, reg = ops.adaround_quantize(w, v, torch.full((6,), 0.05, device=device), bits=4, beta=7.5)
    mean, var = ops.channel_mean_var(y)
    running = ops.channel_stats(x[:2])
    total = ops.channel_stats(x[2:], running)
    zero = ops.inject_stats_grad(y, total.mean, torch.ones(3, device=device), torch.ones(3, device=device),
                                 total.count)
    loss = w_hat.square().sum() + reg + mean.sum() + var.sum() + zero
    loss.backward()


def test_op_calls_do_not_synchronise_with_the_host():
    """Per-call checks read shapes and dtypes only; a value check (scale > 0) would need .item()."""
    _every_op_forward_and_backward("cpu")  # warm-up outside the mode (first-call registrations)
    with _ForbidHostSync():
        _every_op_forward_and_backward("cpu")
    with pytest.raises(AssertionError, match="host synchronisation"), _ForbidHostSync():
        with ops.value_checks(True):  # the debug mode does read values, and is caught
            ops.fake_quantize(torch.randn(3), torch.tensor([0.1]))


@cuda_only
def test_op_calls_do_not_synchronise_the_gpu():
    _every_op_forward_and_backward("cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _every_op_forward_and_backward("cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---------------------------------------------------------------- edge cases
@pytest.mark.parametrize("device", DEVICES)
def test_zero_size_channel_axis_with_a_scale_gradient(device):
    """An empty per-channel axis with a scale that needs a gradient: a clean no-op (no division by
    zero channels in the CUDA launch arithmetic)."""
    for shape, axis in (((0, 3, 2, 2), 0), ((2, 0, 2, 2), 1), ((0, 3), 1)):
        x = torch.randn(shape, device=device, requires_grad=True)
        n = shape[axis]
        s = torch.full((n,), 0.1, device=device, requires_grad=True)
        out = ops.fake_quant(x, s, None, -8, 7, axis)
        gx, gs = torch.autograd.grad(out.sum(), (x, s), allow_unused=True)
        assert out.shape == x.shape and gx.shape == x.shape and gs.shape == s.shape
        gx, gs = OPS.fake_quant_backward(torch.zeros(shape, device=device), x.detach(), s.detach(),
                                         torch.zeros(n, device=device), -8, 7, axis, True)
        assert gs.shape == s.shape and not gs.any()
    w = torch.randn(0, 3, 3, 3, device=device)
    w_hat, reg = ops.adaround_quantize(w, torch.zeros_like(w, requires_grad=True), torch.ones(0, device=device),
                                       bits=4)
    assert w_hat.shape == w.shape and float(reg.detach()) == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_stats_of_a_channel_starting_with_inf_match_the_reference(device):
    x = torch.randn(4, 3, 2, 2, device=device, dtype=torch.float64)
    x[0, 0, 0, 0] = float("inf")
    x[0, 1, 0, 0] = -float("inf")
    x[0, 2, 0, 0] = float("inf")
    x[1, 2, 0, 0] = -float("inf")
    got, want = OPS.channel_stats(x), ref.channel_stats_forward(x)
    torch.testing.assert_close(got[0], want[0], equal_nan=True)
    assert got[0, 0] == float("inf") and got[0, 1] == -float("inf") and torch.isnan(got[0, 2])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_device_merge_equals_host_merge_and_one_shot(device, channels_last):
    torch.manual_seed(3)
    x = (1e4 + 1e-2 * torch.randn(12, 5, 4, 4, dtype=torch.float64)).float().to(device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    chunks = [x[:5], x[5:6], x[6:]]
    on_device, on_host = None, ops.ChannelStats.empty(5, device)
    for ch in chunks:
        on_device = ops.channel_stats(ch, on_device)
        on_host = on_host.merge(ops.channel_stats(ch))
    assert on_device.count == on_host.count == 12 * 16
    torch.testing.assert_close(on_device.data, on_host.data, rtol=1e-15, atol=0)
    want = ref.channel_stats_forward(x)
    torch.testing.assert_close(on_device.mean, want[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(on_device.m2, want[1], rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_merged_stats_gradient_is_the_whole_set_gradient(device):
    """Autograd through channel_stats with running statistics: d(merged mean, M2)/dx of the new chunk."""
    torch.manual_seed(4)
    old = torch.randn(5, 3, 2, 2, dtype=torch.float64, device=device)
    x = torch.randn(3, 3, 2, 2, dtype=torch.float64, device=device, requires_grad=True)
    running = ops.channel_stats(old)
    assert torch.autograd.gradcheck(lambda t: OPS.channel_stats(t, running.data, running.count), (x,))
    assert torch.autograd.gradcheck(lambda t: OPS.channel_stats(t), (x,))


@cuda_only
def test_cuda_reductions_are_deterministic():
    torch.manual_seed(5)
    x = torch.randn(64, 32, 17, 17, device="cuda")
    s = torch.full((1,), 0.05, device="cuda")
    sc = torch.full((32,), 0.05, device="cuda")
    z = torch.zeros(1, device="cuda")
    g = torch.randn_like(x)
    w, v = torch.randn(256, 128, 3, 3, device="cuda"), torch.randn(256, 128, 3, 3, device="cuda")
    runs = []
    for _ in range(3):
        runs.append((OPS.fake_quant_backward(g, x, s, z, -8, 7, -1, True)[1],
                     OPS.fake_quant_backward(g, x, sc, torch.zeros(32, device="cuda"), -8, 7, 1, True)[1],
                     OPS.adaround(w, v, torch.full((256,), 0.01, device="cuda"), torch.zeros(256, device="cuda"),
                                  -8, 7, 0, False, 7.3, True)[1],
                     OPS.channel_stats(x)))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


# ---------------------------------------------------------------- fp16: the injected gradient survives
def test_injected_gradient_survives_fp16():
    """The whole-set BN gradient of one element is ~g/M (1e-11 here): below fp16's smallest subnormal.
    The upstream gradient (the loss scale) is folded into the coefficients before the cast, so the
    fp16 chunk gradient is the scaled gradient, not zero."""
    torch.manual_seed(6)
    x = torch.randn(2, 3, 4, 4).half().requires_grad_(True)
    mean = torch.zeros(3, dtype=torch.float64)
    gm = torch.full((3,), 1e-4, dtype=torch.float64)
    gv = torch.full((3,), 2e-4, dtype=torch.float64)
    m = 1e7
    unscaled = ref.channel_stats_backward(x.detach(), mean, gm, gv, m)
    assert not unscaled.any()  # what casting before scaling gives: every gradient flushed to zero
    scale = 2.0 ** 20
    zero = ops.inject_stats_grad(x, mean, gm, gv, m)
    (g,) = torch.autograd.grad(zero * scale, x)
    assert g.dtype == torch.float16 and bool((g != 0).all())
    want = ref.channel_stats_backward(x.detach().float(), mean, gm * scale, gv * scale, m)
    torch.testing.assert_close(g.float(), want, rtol=2e-3, atol=1e-7)


def test_dynamic_loss_scale_backs_off_on_overflow_and_grows_back():
    from zsq_fast.generate.context import LossScale, grad_of

    class _Run:
        loss_scale = LossScale(value=2.0 ** 30, growth_interval=2)

    x = torch.ones(4, dtype=torch.float16, requires_grad=True)
    loss = (x.float() * 1e-3).sum()  # d/dx = 1e-3: 1e-3 * 2^26 = 67109 overflows fp16 (max 65504), 1e-3 * 2^25 does not
    g = grad_of(_Run, loss, x)
    assert torch.isfinite(g).all() and _Run.loss_scale.value == 2.0 ** 25
    torch.testing.assert_close(g.float(), torch.full((4,), 1e-3), rtol=1e-3, atol=0)
    grad_of(_Run, loss, x)
    assert _Run.loss_scale.value == 2.0 ** 26  # two clean gradients: the scale grows again


# ---------------------------------------------------------------- torch.compile
def _quantized_net():
    from zsq_fast.quantize.modules import QuantConv2d, QuantLinear
    from zsq_fast.quantize.quantizer import QuantSpec

    torch.manual_seed(7)
    w_spec = QuantSpec(bits=4, signed=True, axis=0, pow2=True)
    a_spec = QuantSpec(bits=4, signed=True, pow2=True)
    c1 = QuantConv2d(torch.nn.Conv2d(3, 8, 3, padding=1), w_spec, a_spec)
    c2 = QuantConv2d(torch.nn.Conv2d(8, 8, 3, padding=1, stride=2), w_spec, a_spec)
    fc = QuantLinear(torch.nn.Linear(8 * 4 * 4, 10), w_spec, a_spec)
    for layer in (c1, c2, fc):
        layer.weight_quantizer.set_params(layer.weight.detach().abs().amax((1, 2, 3) if layer.weight.dim() == 4
                                                                          else (1,)) / 7)
        layer.input_quantizer.set_params(torch.tensor([0.25]))
        layer.input_quantizer.scale.requires_grad_(True)  # LSQ
        layer.init_adaround()
        layer.beta = 7.0
    net = torch.nn.Sequential(c1, torch.nn.ReLU(), c2, torch.nn.ReLU(), torch.nn.Flatten(), fc)
    return net, [c1, c2, fc]


def test_compiled_quantized_model_forward_and_backward_match_eager():
    """fullgraph=True: no graph break through fake_quant (pow2 scales, LSQ) and soft AdaRound."""
    x = torch.randn(4, 3, 8, 8)
    results = []
    for compiled in (False, True):
        net, layers = _quantized_net()

        def loss_fn(inp):
            out = net(inp)
            return out.square().mean() + 0.01 * sum(layer.reg for layer in layers)

        fn = torch.compile(loss_fn, fullgraph=True) if compiled else loss_fn
        loss = fn(x)
        params = [layer.v for layer in layers] + [layer.input_quantizer.scale for layer in layers]
        results.append((loss.detach(), torch.autograd.grad(loss, params)))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b)


def test_inductor_compiles_the_quantized_forward():
    net, _ = _quantized_net()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(net, fullgraph=True)(x), net(x))


def test_compiled_exact_dgh_chunk_step_matches_eager():
    """One chunk of an exact DGH step (pass 2): views, forward with BN capture, the injected whole-set
    gradient at every BN input and ODSL, compiled with fullgraph=True."""
    from zsq_fast.generate.bn_capture import BNCapture, find_bn_layers
    from zsq_fast.generate.losses import odsl
    from zsq_fast.generate.views import apply_view, draw_views
    from zsq_fast.models.digits_cnn import digits_cnn

    torch.manual_seed(8)
    model = digits_cnn().eval()
    layers = find_bn_layers(model)
    images = torch.randn(6, 3, 20, 20)
    lo, hi = torch.full((3,), -2.0), torch.full((3,), 2.0)
    views = draw_views(6, 4, torch.Generator().manual_seed(1))
    with BNCapture(layers) as cap:
        def acts_of(x):
            cap.clear()
            out = model(apply_view(x, views, (16, 16), lo, hi))
            return [x] + cap.take(), out

        with torch.no_grad():  # pass 1: whole-set statistics (a single chunk here)
            acts, _ = acts_of(images)
            totals = [ops.channel_stats(a) for a in acts[1:]]
        grads = [(torch.randn(t.mean.shape[0], dtype=torch.float64) * 1e-2,
                  torch.rand(t.mean.shape[0], dtype=torch.float64) * 1e-2) for t in totals]
        targets = (layers[-1].mean, layers[-1].std)

        def chunk_loss(x):
            acts, logits = acts_of(x)
            loss = sum(ops.inject_stats_grad(a, t.mean, gm, gv, t.count)
                       for a, t, (gm, gv) in zip(acts[1:], totals, grads))
            return loss + 1e-3 * odsl(logits, acts[-1], targets, True).sum()

        out = []
        for fn in (chunk_loss, torch.compile(chunk_loss, fullgraph=True)):
            x = images.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(fn(x), x)
            out.append(g)
    torch.testing.assert_close(out[1], out[0], rtol=1e-5, atol=1e-9)

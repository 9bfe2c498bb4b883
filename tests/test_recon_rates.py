"""Reconstruction at the iteration counts people run: rates that follow the count, power-of-two activation
scales that LSQ can move (learned as log2 s with a straight-through round), and checked rate arguments."""
import math

import pytest
import torch
from torch import nn

from zsq_fast.quantize import quantize
from zsq_fast.quantize.adaround import REFERENCE_ACT_LR, REFERENCE_LR, default_rates
from zsq_fast.quantize.quantizer import Quantizer, QuantSpec


def test_default_rates_follow_the_iteration_count():
    assert default_rates(20000) == (REFERENCE_LR, REFERENCE_ACT_LR)
    assert default_rates(2000) == pytest.approx((10 * REFERENCE_LR, 10 * REFERENCE_ACT_LR))
    assert default_rates(100000) == (REFERENCE_LR, REFERENCE_ACT_LR)  # never below BRECQ's
    assert default_rates(1) == pytest.approx((100 * REFERENCE_LR, 100 * REFERENCE_ACT_LR))  # capped
    lr_a, _ = default_rates(500)
    lr_b, _ = default_rates(5000)
    assert lr_a * 500 == pytest.approx(lr_b * 5000)  # lr x iterations is what BRECQ's schedule allows


def _fq(x: torch.Tensor, s: float) -> torch.Tensor:
    q = Quantizer(QuantSpec(4, signed=True, pow2=True))
    q.set_params(torch.tensor([s]))
    return q(x).detach()


def _lsq_steps(q: Quantizer, x: torch.Tensor, steps: int, relative_step: float) -> list[float]:
    t = q.start_learning()
    opt = torch.optim.Adam([t], lr=q.learning_rate(relative_step))
    seen = []
    for _ in range(steps):
        loss = (q(x) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen.append(float(q.effective_scale()))
    q.stop_learning()
    return seen


def test_pow2_scale_moves_by_octaves_and_stays_a_power_of_two():
    torch.manual_seed(0)
    x = torch.randn(4096) * 4.0                    # needs s of about 2 at 4 bits (signed, |x| up to ~12)
    q = Quantizer(QuantSpec(4, signed=True, pow2=True))
    q.set_params(torch.tensor([1 / 16]))           # far too small: heavy clipping
    seen = _lsq_steps(q, x, 300, 0.02)
    assert all(math.log2(s) == round(math.log2(s)) for s in seen)   # exactly 2^k at every use
    final = float(q.scale)
    assert final >= 1.0, seen[::30]                # moved up by >= 4 octaves in 300 small steps
    assert math.log2(final) == round(math.log2(final)) and q.log2_scale is None and not q.scale.requires_grad
    # and it ends where the MSE is lowest among powers of two
    err = {k: float((_fq(x, 2.0 ** k) - x).pow(2).mean()) for k in range(-4, 4)}
    assert math.log2(final) in sorted(err, key=err.get)[:2], (final, err)


def test_free_scale_is_learned_directly():
    torch.manual_seed(0)
    x = torch.randn(4096) * 4.0
    q = Quantizer(QuantSpec(4, signed=True, pow2=False))
    q.set_params(torch.tensor([0.5]))
    seen = _lsq_steps(q, x, 200, 0.02)
    assert seen[-1] > 1.0 and len(set(seen)) > 100  # moves continuously
    assert q.log2_scale is None and not q.scale.requires_grad


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.b(torch.relu(self.a(x))).mean((2, 3)))


def test_quantize_records_the_rates_it_used_and_checks_them():
    torch.manual_seed(0)
    net, x = _Net().eval(), torch.randn(16, 3, 6, 6)
    q = quantize(net, x, "W4A4", method="brecq", iterations=40, batch_size=8)
    rec = q.quant_config["reconstruction"]
    assert (rec["lr"], rec["act_lr"]) == pytest.approx(default_rates(40))
    for m in q.modules():  # pow2 activation scales end as exact powers of two, not learning any more
        if isinstance(m, Quantizer) and m.spec.pow2:
            s = m.scale.detach()
            assert torch.equal(s, torch.exp2(torch.round(torch.log2(s)))) and m.log2_scale is None
    q = quantize(net, x, "W4A4", method="adaround", iterations=5, batch_size=8, lr=3e-3, act_lr=1e-3, reg_weight=0)
    rec = q.quant_config["reconstruction"]
    assert (rec["lr"], rec["act_lr"], rec["reg_weight"]) == (3e-3, 1e-3, 0)
    for kw, name in (({"lr": 0}, "lr"), ({"act_lr": -1e-3}, "act_lr"), ({"reg_weight": float("nan")}, "reg_weight"),
                     ({"lr": "0.1"}, "lr"), ({"act_lr": True}, "act_lr")):
        with pytest.raises((ValueError, TypeError), match=name):
            quantize(net, x, "W4A4", method="brecq", iterations=2, **kw)

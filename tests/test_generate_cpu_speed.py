"""bf16 autocast and channels_last for generation on CPU: what the model sees, what stays fp32, results."""
import pytest
import torch

import zsq_fast
from zsq_fast.generate import api
from zsq_fast.generate.context import forward
from test_generate import tiny


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_bf16_and_channels_last_reach_the_model_on_cpu():
    model = tiny().eval().requires_grad_(False)
    s, dev = api.make_settings(model, 4, "dgh", 8, amp="bf16", channels_last=True)
    run, _ = api.build_run(model, s, dev)
    x = run.store.load(slice(0, 4), dev).requires_grad_(True)
    with run.capture:
        acts, logits = forward(run, x)
        acts[1].float().sum().backward()
    assert acts[1].dtype == torch.bfloat16 and logits.dtype == torch.bfloat16
    assert acts[1].is_contiguous(memory_format=torch.channels_last) and not acts[1].is_contiguous()
    assert x.grad.dtype == torch.float32 and x.grad.is_contiguous()  # the store's layout and dtype
    assert run.store.x.dtype == run.store.exp_avg.dtype == torch.float32


@pytest.mark.parametrize("aggregation", ["exact", "stale"])
def test_bf16_channels_last_generation_tracks_fp32(aggregation):
    common = dict(iterations=20, chunk_size=3, lr=1.0, seed=2, aggregation=aggregation)
    ref, rec_ref = zsq_fast.generate(tiny(), 6, "dgh", 8, **common)
    nhwc, rec_nhwc = zsq_fast.generate(tiny(), 6, "dgh", 8, channels_last=True, **common)
    low, rec_low = zsq_fast.generate(tiny(), 6, "dgh", 8, amp="bf16", channels_last=True, **common)
    assert rec_low.settings["amp"] == "bf16" and rec_low.settings["channels_last"] is True
    assert low.dtype == torch.float32
    # channels_last alone changes summation order only
    torch.testing.assert_close(nhwc, ref, rtol=0, atol=1e-3)
    # bf16 (8-bit mantissa) moves the images, but the optimisation reaches the same BN loss
    assert not torch.equal(low, ref)
    assert rec_low.final_bn_loss < 0.8 * rec_low.initial_bn_loss
    assert rec_low.final_bn_loss == pytest.approx(rec_ref.final_bn_loss, rel=0.02)
    assert rec_ref.final_bn_loss < 0.8 * rec_ref.initial_bn_loss


def test_fp16_stays_cuda_only():
    with pytest.raises(ValueError, match="amp='fp16' needs a CUDA device.*bf16"):
        zsq_fast.generate(tiny(), 4, "dgh", 8, iterations=1, amp="fp16", device="cpu")
    with pytest.raises(TypeError, match="channels_last"):
        zsq_fast.generate(tiny(), 4, "dgh", 8, iterations=1, channels_last="yes")

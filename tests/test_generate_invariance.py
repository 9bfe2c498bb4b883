"""Exact dgh: chunk_size and the number of ranks are memory / parallelism knobs only. ResNet-20 (pretrained
CIFAR weights from ../shared/data when present, else seeded random weights with perturbed BN statistics),
end to end through generate(): the same bits for chunk N and N/4, and for 1 process and 2 gloo ranks."""
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import zsq_fast
from zsq_fast import distributed as zd
from zsq_fast.generate import fixed_order
from zsq_fast.models.cifar_resnet import resnet20

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: the ranks run 1 thread each too

WEIGHTS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "weights" / "cifar10_resnet20.pt"
N = 32
COMMON = dict(iterations=3, lr=16.0, seed=0, device="cpu")


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = resnet20()
    if WEIGHTS.exists():
        sd = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
        m.load_state_dict(sd.get("state_dict", sd) if isinstance(sd, dict) else sd)
    else:  # non-trivial BN targets, so the images move
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


def _gen(chunk_size, **kw):
    images, rec = zsq_fast.generate(model(), N, "dgh", 32, chunk_size=chunk_size, **{**COMMON, **kw})
    return images, rec


def test_exact_dgh_images_do_not_depend_on_the_chunk_size():
    a, ra = _gen(N)
    b, rb = _gen(N // 4)
    assert (a - b).abs().max().item() == 0.0  # bit for bit, the default ODSL weight on
    assert [s["bn"] for s in ra.losses] == [s["bn"] for s in rb.losses]
    assert ra.settings["odsl_units"] == "per_image_ref32" and ra.settings["odsl_weight"] == 1e-5


def test_fixed_order_statistics_equal_the_float64_statistics_for_any_split():
    g = torch.Generator().manual_seed(1)
    x = 1e3 + torch.randn(13, 4, 5, 3, generator=g)  # |mean| >> std: a naive merge would show it
    ref = x.double().transpose(0, 1).reshape(4, -1)
    results = []
    for cuts in ([0, 13], [0, 4, 8, 12, 13], [0, 1, 2, 7, 13]):
        t = fixed_order.FixedOrderStats()
        for a, b in zip(cuts, cuts[1:]):
            t.add_chunk(a, x[a:b])
        s = fixed_order.finish([t])[0]
        assert s.count == 13 * 15
        torch.testing.assert_close(s.mean, ref.mean(1), rtol=1e-13, atol=0)
        torch.testing.assert_close(s.var, ref.var(1, unbiased=False), rtol=1e-9, atol=0)
        results.append(s.data)
    assert all(torch.equal(results[0], r) for r in results[1:])
    xl = x.contiguous(memory_format=torch.channels_last)  # the per-image path
    for cuts in ([0, 13], [0, 4, 8, 12, 13]):
        t = fixed_order.FixedOrderStats()
        for a, b in zip(cuts, cuts[1:]):
            t.add_chunk(a, xl[a:b])
        results.append(fixed_order.finish([t])[0].data)
    assert torch.equal(results[-2], results[-1])
    torch.testing.assert_close(results[-1], results[0], rtol=1e-12, atol=0)
    t = fixed_order.FixedOrderStats()
    t.add_chunk(0, x[:4])
    with pytest.raises(ValueError, match="index order"):
        t.add_chunk(5, x[5:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir, chunk_size):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    zd.init_from_env("cpu", timeout_s=60)
    try:
        images, rec = _gen(chunk_size)
        torch.save({"images": images, "shard": rec.shard, "bn": [s["bn"] for s in rec.losses]},
                   os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_exact_dgh_images_are_the_same_on_two_ranks_as_in_one_process(tmp_path):
    chunk = 8  # 4 chunks: 2 per rank
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, str(tmp_path), chunk)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    parts = [torch.load(tmp_path / f"r{r}.pt", weights_only=False) for r in range(2)]
    assert [(p["shard"]["start"], p["shard"]["stop"]) for p in parts] == [(0, 16), (16, 32)]
    two = torch.cat([p["images"] for p in parts])
    one, rec = _gen(chunk)
    assert (one - two).abs().max().item() == 0.0
    assert parts[0]["bn"] == parts[1]["bn"] == [s["bn"] for s in rec.losses]


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_and_layout_follow_the_cpu_and_are_recorded(monkeypatch, native):
    from zsq_fast.generate import api

    monkeypatch.setattr(api, "cpu_native_bf16", lambda: native)
    s, _ = api.make_settings(model(), 4, "dgh", 32, amp="auto", channels_last="auto", device="cpu")
    assert (s.amp, s.channels_last) == (("bf16" if native else None), True)
    assert set(s.auto) == {"amp", "channels_last"} and ("native bf16" in s.auto["amp"])
    assert "auto" not in api.compared_settings(s)  # a resume on another CPU compares the resolved amp only
    s, _ = api.make_settings(model(), 4, "dgh", 32, device="cpu")
    assert (s.amp, s.channels_last, s.auto) == (None, False, {})  # the default stays fp32 NCHW
    with pytest.raises(zsq_fast.errors.InvalidArgumentError, match="'auto'"):
        api.make_settings(model(), 4, "dgh", 32, amp="bf17")
    with pytest.raises(zsq_fast.errors.InvalidTypeError, match="'auto'"):
        api.make_settings(model(), 4, "dgh", 32, channels_last="yes")

"""The hot loops read no tensor value on the host per chunk or per iteration.

On a GPU every read of a tensor's value (`float(t)`, `t.item()`, `bool(t)`, `t.tolist()`, ...) waits for the
device to finish all queued work: one per chunk or per reconstruction iteration stalls the stream that often.
The loops keep their sums on the device and read them once per step (generators) or once per unit
(reconstruction). These tests count the reads zsq_fast's own code makes (the calling frame is in the package;
torch's own, e.g. Adam reading its CPU step counter, are not counted) and require the count per step to be
independent of the number of chunks, and a reconstruction's count independent of its iterations.
A CUDA variant counts the syncs the driver sees (torch.cuda.set_sync_debug_mode), blocking copies included.
"""
import collections
import contextlib
import sys
import warnings
from pathlib import Path

import pytest
import torch

import zsq_fast
from conftest import bn_statistics_from_noise, cuda_only
from zsq_fast.models import digits_cnn

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

PACKAGE = str(Path(zsq_fast.__file__).resolve().parent)
# .numpy() is no read of its own: a CUDA tensor must go .cpu() first, and that copy is the sync
READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "__complex__")


@contextlib.contextmanager
def host_reads():
    """Counter of value reads of tensors by zsq_fast code, keyed 'file:line method'."""
    counts = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counted(name, fn):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(PACKAGE):
                counts[f"{Path(caller).relative_to(PACKAGE)}:{sys._getframe(1).f_lineno} {name}"] += 1
            return fn(self, *args, **kwargs)
        return read

    for name, fn in originals.items():
        setattr(torch.Tensor, name, counted(name, fn))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def model():
    torch.manual_seed(0)
    return bn_statistics_from_noise(digits_cnn(), (8, 3, 8, 8))


def generate_reads(method: str, iterations: int, chunk_size: int, **kw) -> collections.Counter:
    m = model()
    if method == "fdda":
        g = torch.Generator().manual_seed(1)
        kw.update(real_images=torch.randn(4, 3, 8, 8, generator=g), real_labels=torch.arange(4) % 2)
    with host_reads() as counts:
        zsq_fast.generate(m, 16, method, 8, iterations=iterations, chunk_size=chunk_size, device="cpu", **kw)
    return counts


def per_step(method: str, chunk_size: int, **kw) -> collections.Counter:
    """Reads of two more steps (setup and final measurements cancel), per step."""
    one, three = generate_reads(method, 1, chunk_size, **kw), generate_reads(method, 3, chunk_size, **kw)
    return collections.Counter({k: (three[k] - one[k]) / 2 for k in three if three[k] != one[k]})


GENERATORS = [("dgh", {"aggregation": "exact"}), ("dgh", {"aggregation": "stale"}),
              ("dgh", {"aggregation": "stale", "stale_refresh": "before_update"}), ("bns", {}), ("fdda", {})]


@pytest.mark.parametrize("method,kw", GENERATORS, ids=lambda v: v if isinstance(v, str) else
                         "-".join(map(str, v.values())))
def test_generator_reads_once_per_step_whatever_the_chunks(method, kw):
    # 16 images in 2 or 8 chunks (fdda: 2 classes of 8 images, one or four batches each)
    few, many = per_step(method, 8, **kw), per_step(method, 2, **kw)
    assert sum(many.values()) == sum(few.values()), f"reads per step grow with the chunks: {dict(many)}"
    # one read of the step's sums and checks; nothing per chunk, per layer or per loss term
    assert sum(many.values()) <= 1, dict(many)


def quantize_reads(method: str, iterations: int, progress=None, **kw) -> collections.Counter:
    m = model()
    images = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with host_reads() as counts:
        zsq_fast.quantize(m, images, "W4A4", "hw", method=method, iterations=iterations, batch_size=4,
                          device="cpu", progress=progress, **kw)
    return counts


@pytest.mark.parametrize("method,kw", [("brecq", {}), ("adaround", {}), ("brecq", {"qdrop": True}),
                                       ("brecq", {"cache": "device"})], ids=["brecq", "adaround", "qdrop", "device"])
def test_reconstruction_reads_nothing_per_iteration(method, kw):
    short, long = quantize_reads(method, 2, **kw), quantize_reads(method, 10, **kw)
    grown = {k: long[k] - short[k] for k in long if long[k] != short[k]}
    assert not grown, f"reads that grow with the iterations: {grown}"


def test_reconstruction_reads_the_loss_only_when_reported():
    calls = []
    short = quantize_reads("brecq", 2, progress=lambda *a: calls.append(a))
    n_short = len(calls)
    long = quantize_reads("brecq", 10, progress=lambda *a: calls.append(a))
    grown = sum(long.values()) - sum(short.values())
    assert grown == len(calls) - 2 * n_short  # one read per reported iteration, none in between


def test_calibration_pass_reads_no_range_per_batch():
    # ActObserver keeps the running min/max on the device and reads them once (8 vs 16 batches of 2). Not
    # counted: the finiteness check of every layer input per batch (validate.check_finite_activation), which
    # names the batch that failed
    def reads(n_images):
        m = model()
        images = torch.randn(n_images, 3, 8, 8, generator=torch.Generator().manual_seed(2))
        with host_reads() as counts:
            zsq_fast.quantize(m, images, "W4A4", "hw", method="nearest", batch_size=2, device="cpu")
        return counts
    a, b = reads(16), reads(32)
    grown = {k: b[k] - a[k] for k in b if b[k] != a[k] and k.startswith("quantize/calibrate.py")}
    assert not grown, f"calibration reads per batch: {grown}"


def cuda_syncs(fn) -> int:
    """Synchronizing CUDA calls fn makes (item/tolist, blocking copies, stream syncs), as the driver sees them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


@cuda_only
@pytest.mark.parametrize("method,kw", [("dgh", {"aggregation": "exact"}), ("dgh", {"aggregation": "exact", "store": "device"}),
                                       ("dgh", {"aggregation": "stale"}), ("bns", {})])
def test_cuda_generator_syncs_per_step_do_not_grow_with_the_chunks(method, kw):
    def per_step(chunk_size):
        run = lambda steps: lambda: zsq_fast.generate(model().cuda(), 64, method, 8, iterations=steps,  # noqa: E731
                                                      chunk_size=chunk_size, device="cuda", **kw)
        return (cuda_syncs(run(3)) - cuda_syncs(run(1))) / 2
    few, many = per_step(32), per_step(8)
    assert many == few, f"syncs per step: {few} with 2 chunks, {many} with 8"
    assert many <= 4, many  # the losses' read, and the host store's drain after each pass over the chunks


@cuda_only
@pytest.mark.parametrize("cache", ["host", "device"])
def test_cuda_reconstruction_syncs_do_not_grow_with_the_iterations(cache):
    images = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    run = lambda iterations: lambda: zsq_fast.quantize(model(), images, "W4A4", "hw", method="brecq",  # noqa: E731
                                                       iterations=iterations, batch_size=4, device="cuda",
                                                       cache=cache)
    short, long = cuda_syncs(run(2)), cuda_syncs(run(10))
    assert long == short, f"syncs: {short} at 2 iterations per unit, {long} at 10"

"""generate/streaming.py: overlapped store I/O (read-ahead, write-behind; on CUDA a side stream) gives
bit-identical runs to the plain path, keeps reads ordered after writes, and drains before a step ends.
Also the disk store's double buffering (generate/run_folder.py) that the stream writes into."""
import threading

import pytest
import torch

import zsq_fast
from zsq_fast.generate import run_folder, streaming
from zsq_fast.generate.run_folder import DiskStore, RunFolderError, open_run_folder
from zsq_fast.generate.store import make_store
from zsq_fast.generate.streaming import ChunkStream
from conftest import cuda_only
from test_generate import tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

COMMON = dict(iterations=4, chunk_size=3, lr=0.2, seed=5)
RUNS = [("dgh", {"aggregation": "exact"}), ("dgh", {"aggregation": "stale"}),
        ("dgh", {"aggregation": "stale", "stale_refresh": "before_update"}), ("bns", {})]


def _fdda_kw():
    g = torch.Generator().manual_seed(4)
    return dict(real_images=torch.randn(5, 3, 8, 8, generator=g), real_labels=torch.arange(5))


def _generate(monkeypatch, overlap, method, kw, **more):
    monkeypatch.setattr(streaming, "OVERLAP", overlap)
    return zsq_fast.generate(tiny(), 7, method, 8, **COMMON, **kw, **more)


@pytest.mark.parametrize("method,kw", RUNS + [("fdda", None)])
def test_overlapped_disk_store_equals_the_plain_path(tmp_path, monkeypatch, method, kw):
    kw = _fdda_kw() if kw is None else kw
    plain, rec_plain = _generate(monkeypatch, False, method, kw, store="disk", checkpoint=tmp_path / "plain")
    made = []
    real_init = ChunkStream.__init__

    def record(self, *a, **k):
        real_init(self, *a, **k)
        made.append(self)
    monkeypatch.setattr(ChunkStream, "__init__", record)
    streamed, rec = _generate(monkeypatch, True, method, kw, store="disk", checkpoint=tmp_path / "streamed")
    assert made and all(s._io is None and s.copy_stream is None for s in made)  # closed after the run
    assert torch.equal(streamed, plain)
    assert rec.losses == rec_plain.losses and rec.final_bn_loss == rec_plain.final_bn_loss
    host, rec_host = _generate(monkeypatch, True, method, kw)
    assert torch.equal(host, plain) and rec_host.losses == rec_plain.losses


def test_what_overlaps_where(tmp_path):
    host = make_store(torch.zeros(4, 3, 2, 2), torch.device("cpu"))
    assert not ChunkStream(host, "cpu").overlapped  # CPU + host store: plain copies, no thread
    disk, _ = open_run_folder(tmp_path / "run", {}, (4, 3, 2, 2), lambda: [])
    stream = ChunkStream(disk, "cpu")
    assert stream.overlapped and stream._io is not None and stream.copy_stream is None
    stream.close()
    assert not ChunkStream(disk, "cpu", overlap=False).overlapped
    disk.close()


class SlowStore(DiskStore):
    """A disk store whose writes wait for `release` and whose reads are logged."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.release, self.reads, self.read_started = threading.Event(), [], threading.Event()

    def read(self, name, sl, out=None):
        self.reads.append((name, sl.start))
        self.read_started.set()
        return super().read(name, sl, out)

    def put(self, sl, *tensors):
        assert self.release.wait(10)
        super().put(sl, *tensors)


def _slow_store(tmp_path, n=12):
    x0 = torch.arange(n * 3 * 2 * 2, dtype=torch.float32).view(n, 3, 2, 2)
    store, _ = open_run_folder(tmp_path / "run", {}, tuple(x0.shape), lambda: [(slice(0, n), x0)])
    store.close()
    return SlowStore(tmp_path / "run", tuple(x0.shape)), x0


def test_writes_are_behind_reads_ahead_and_the_loop_drains(tmp_path):
    store, x0 = _slow_store(tmp_path)
    stream = ChunkStream(store, "cpu")
    store.begin_step(1)
    chunks = stream.chunks(store.chunks(4), moments=True)
    sl, (x, m, v) = next(chunks)
    assert sl == slice(0, 4) and torch.equal(x, x0[:4])
    # while chunk 0 is in the caller's hands, chunk 1 is being read
    for _ in range(1000):
        if ("x", 4) in store.reads:
            break
        threading.Event().wait(0.01)
    assert ("x", 4) in store.reads
    stream.put(sl, x + 1, m + 2, v + 3)  # returns although the store's write is blocked
    assert len(stream._writes) == 1 and not stream._writes[0].done()
    # reading the chunk just written back needs no I/O (the write is still blocked) ...
    assert torch.equal(stream.load(sl), x0[:4] + 1) and not stream._writes[0].done()
    # ... and a read from the store asked for after a write waits for it and sees it
    store.release.set()
    assert torch.equal(stream.load(slice(0, 8)), torch.cat([x0[:4] + 1, x0[4:8]]))
    for sl, (x, m, v) in chunks:  # chunks 1, 2
        store.release.clear()
        stream.put(sl, x + 1, m + 2, v + 3)
        assert not stream._writes[-1].done()
        store.release.set()
    # ... the loop's end drained every write
    assert not stream._writes
    store.finish_step()
    store.commit_step()
    assert torch.equal(store.read("x", slice(0, 12)), x0 + 1)
    assert torch.equal(store.read("exp_avg_sq", slice(0, 12)), torch.full_like(x0, 3))
    stream.close()
    store.close()


def test_a_failed_write_is_raised_when_the_loop_drains(tmp_path):
    store, _ = _slow_store(tmp_path)
    store.release.set()
    stream = ChunkStream(store, "cpu")

    def broken(sl, *tensors):
        raise RunFolderError("checkpoint folder X: cannot write x.1.f32 (No space left on device)")
    store.put = broken
    with pytest.raises(RunFolderError, match="No space left"):
        for sl, x in stream.chunks(store.chunks(4)):
            stream.put(sl, x)
    stream.close()
    store.close()


def test_double_buffer_reads_the_newest_images_and_keeps_the_last_step(tmp_path):
    n = 10
    x0 = torch.randn(n, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    store, _ = open_run_folder(tmp_path / "run", {}, tuple(x0.shape), lambda: [(slice(0, n), x0)])
    store.begin_step(1)
    store.put(slice(2, 5), x0[2:5] + 1, x0[2:5] + 2, x0[2:5] + 3)
    mixed = x0.clone()
    mixed[2:5] += 1
    assert torch.equal(store.read("x", slice(0, 7)), mixed[:7])  # across written and unwritten images
    assert torch.equal(store.read("x", slice(2, 5)), x0[2:5] + 1)
    # the last finished step is untouched in its own buffer until the commit
    assert torch.equal(run_folder.mapped(run_folder.buffer_file(store.folder, "x", 0), x0.shape), x0)
    store.finish_step()  # the images the step did not write are carried over
    store.commit_step()
    assert store.step == 1
    assert torch.equal(store.x, mixed)
    assert torch.equal(store.read("exp_avg", slice(0, n))[2:5], x0[2:5] + 2)
    assert torch.equal(store.read("exp_avg", slice(0, 2)), torch.zeros(2, 3, 2, 2))
    with pytest.raises(ValueError, match="step 3 cannot follow step 1"):
        store.begin_step(3)
    store.close()


@cuda_only
@pytest.mark.parametrize("store", ["host", "disk"])
@pytest.mark.parametrize("method,kw", RUNS)
def test_cuda_side_stream_equals_the_plain_path(tmp_path, monkeypatch, store, method, kw):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)  # the same kernels in both runs
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    plain, rec_plain = _generate(monkeypatch, False, method, kw, device="cuda", store=store,
                                 checkpoint=tmp_path / "plain" if store == "disk" else None)
    streamed, rec = _generate(monkeypatch, True, method, kw, device="cuda", store=store,
                              checkpoint=tmp_path / "streamed" if store == "disk" else None)
    assert torch.equal(streamed.cpu(), plain.cpu()) and rec.losses == rec_plain.losses


@cuda_only
@pytest.mark.parametrize("kind", ["host", "disk"])
def test_cuda_chunks_come_over_a_side_stream(tmp_path, kind):
    x0 = torch.randn(10, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    if kind == "host":
        store = make_store(x0, torch.device("cpu"))
        assert store.x.is_pinned()
    else:
        store, _ = open_run_folder(tmp_path / "run", {}, tuple(x0.shape), lambda: [(slice(0, 10), x0)])
        store.begin_step(1)
    stream = ChunkStream(store, "cuda")
    assert stream.copy_stream is not None and stream.copy_stream != torch.cuda.current_stream()
    for sl, (x, m, v) in stream.chunks(store.chunks(3), moments=True):
        assert x.is_cuda and torch.equal(x.cpu(), x0[sl])
        stream.put(sl, x * 2, m + 1, v + 1)
    assert torch.equal(stream.load(slice(0, 10)).cpu(), x0 * 2)  # after every write
    stream.close()

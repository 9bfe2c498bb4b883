"""Calibration data beyond an in-memory tensor: Datasets, DataLoaders, memory-mapped sets (quantize/calib_data.py).

The same images as a tensor, a Dataset or a DataLoader give the same quantized model; a lazy source is
read a batch at a time (never held whole), and its bad items are named by index.
"""
import weakref

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from zsq_fast.errors import InvalidArgumentError, InvalidTypeError, NonFiniteError, ShapeMismatchError
from zsq_fast.models.digits_cnn import DigitsCNN
from zsq_fast.quantize import quantize
from zsq_fast.quantize.calib_data import CalibData


class Images(Dataset):
    """(image, label) items from a tensor; counts reads and how many returned images are alive at once."""

    def __init__(self, x: torch.Tensor, labelled: bool = True):
        self.x, self.labelled = x, labelled
        self.reads = 0
        self.alive = 0
        self.peak_alive = 0

    def __len__(self):
        return self.x.shape[0]

    def _gone(self):
        self.alive -= 1

    def __getitem__(self, i):
        self.reads += 1
        img = self.x[i].clone()  # a fresh tensor per read, as decoding a file would give
        self.alive += 1
        self.peak_alive = max(self.peak_alive, self.alive)
        weakref.finalize(img, self._gone)
        return (img, i % 10) if self.labelled else img


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = DigitsCNN(width=4)
    for bn in m.modules():  # non-trivial BN statistics to fold
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    return m.eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(48, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


BRECQ = dict(method="brecq", iterations=6, batch_size=8, calibration="mse", act_samples=2048)


@pytest.mark.parametrize("kw", [dict(method="nearest", calibration="mse", batch_size=8, act_samples=2048), BRECQ])
def test_dataset_and_dataloader_equal_the_tensor(model, images, kw):
    ref = quantize(model, images, cache="recompute", **kw)
    ds = Images(images)
    q_ds = quantize(model, ds, **kw)
    # the loader's own batch size, shuffling and workers do not change what quantize reads
    q_dl = quantize(model, DataLoader(Images(images, labelled=False), batch_size=5, shuffle=True), **kw)
    _same(ref, q_ds)
    _same(ref, q_dl)
    if kw["method"] == "brecq":
        rec = q_ds.quant_config["reconstruction"]
        assert rec["cache"] == "recompute" and "lazily" in rec["cache_reason"]
        assert ref.quant_config["reconstruction"]["cache_reason"] == "as requested"
    assert q_ds.quant_config["num_calibration_images"] == 48


def test_a_dataset_is_read_a_batch_at_a_time(model, images):
    ds = Images(images)
    quantize(model, ds, **BRECQ)
    # never more than one batch of images alive at once (the whole set would be 48)
    assert 0 < ds.peak_alive <= BRECQ["batch_size"]
    assert ds.alive == 0
    assert ds.reads >= images.shape[0]  # the observers saw every image


def test_memory_mapped_tensor_stays_lazy_and_matches(model, images, tmp_path):
    path = tmp_path / "images.f32"
    images.numpy().tofile(path)
    mm = torch.from_file(str(path), shared=False, size=images.numel(), dtype=torch.float32).view(images.shape)
    data = CalibData(mm)
    assert data.lazy and data.n == 48 and data.image_shape == (3, 16, 16)
    assert not CalibData(images).lazy
    assert CalibData(np.memmap(path, dtype=np.float32, mode="r", shape=tuple(images.shape))).lazy
    q_mm = quantize(model, mm, **BRECQ)
    assert q_mm.quant_config["reconstruction"]["cache"] == "recompute"
    _same(quantize(model, images, cache="recompute", **BRECQ), q_mm)


def test_calib_data_batches_in_order(images):
    data = CalibData(Images(images))
    got = list(data.batches(20))
    assert [i for i, _ in got] == [0, 20, 40] and [b.shape[0] for _, b in got] == [20, 20, 8]
    assert torch.equal(torch.cat([b for _, b in got]), images)
    assert torch.equal(data.take(torch.tensor([5, 1, 5])), images[[5, 1, 5]])


class _Stream(IterableDataset):
    def __iter__(self):
        yield torch.zeros(3, 16, 16)


def test_lazy_sources_give_one_clear_error(model, images):
    bad = images.clone()
    bad[37, 0, 1, 1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"indices 37"):
        quantize(model, Images(bad), batch_size=8)
    odd = [images[i] for i in range(10)] + [torch.zeros(3, 8, 8)]
    with pytest.raises(ShapeMismatchError, match=r"calib_images\[8:11\].*\(3, 8, 8\)|different shapes"):
        quantize(model, odd_dataset(odd), batch_size=8)
    with pytest.raises(InvalidTypeError, match="must be float"):
        quantize(model, odd_dataset([torch.zeros(3, 16, 16, dtype=torch.uint8)]))
    with pytest.raises(InvalidTypeError, match="IterableDataset"):
        quantize(model, DataLoader(_Stream()))
    with pytest.raises(InvalidArgumentError, match="empty"):
        quantize(model, odd_dataset([]))
    with pytest.raises(InvalidTypeError, match=r"calib_images\[0\] must be an image tensor"):
        quantize(model, odd_dataset(["not an image"]))


def odd_dataset(items):
    class _L(Dataset):
        def __len__(self):
            return len(items)

        def __getitem__(self, i):
            return items[i]
    return _L()


def test_disk_cache_equals_host_cache_and_leaves_nothing(model, images, tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    folder.mkdir()
    monkeypatch.setenv("ZSQ_FAST_CACHE_DIR", str(folder))
    q_disk = quantize(model, Images(images), cache="disk", **BRECQ)
    assert q_disk.quant_config["reconstruction"]["cache"] == "disk"
    _same(quantize(model, images, cache="host", **BRECQ), q_disk)
    assert list(folder.iterdir()) == []  # the files are unlinked as soon as they are mapped

    from collections import namedtuple

    from zsq_fast.quantize import cache as cache_mod
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(cache_mod.shutil, "disk_usage", lambda p: usage(1 << 30, 1 << 30, 1000))
    with pytest.raises(InvalidArgumentError, match=r'cache="disk".*GiB in .*ZSQ_FAST_CACHE_DIR'):
        quantize(model, images, cache="disk", **BRECQ)

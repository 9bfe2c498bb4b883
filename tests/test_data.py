import numpy as np
import pytest
import torch
from PIL import Image

from zsq_fast.data import load_images_for, one_per_class, random_subset, resize_center, to_uint8_hwc

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _npz(path, n=6, size=8, **extra):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    y = np.arange(n) % 3
    np.savez(path, x=x, y=y, **extra)
    return x, y


def test_npz_normalizes_and_batches(tmp_path):
    x, y = _npz(tmp_path / "d.npz")
    data = load_images_for(str(tmp_path / "d.npz"), MEAN, STD, 8)
    batches = list(data.batches(4))
    assert [b[0].shape[0] for b in batches] == [4, 2]
    got = torch.cat([b[0] for b in batches])
    want = (torch.tensor(x).permute(0, 3, 1, 2).float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.equal(torch.cat([b[1] for b in batches]), torch.tensor(y))
    np.testing.assert_array_equal(to_uint8_hwc(got, MEAN, STD), x)  # the inverse for viewing
    assert load_images_for(str(tmp_path / "d.npz"), MEAN, STD, 8, limit=2).n == 2


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "nox.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="has no array 'x'.*found: images"):
        load_images_for(str(tmp_path / "nox.npz"), MEAN, STD, 4)
    np.savez(tmp_path / "f.npz", x=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="must be uint8"):
        load_images_for(str(tmp_path / "f.npz"), MEAN, STD, 4)
    np.savez(tmp_path / "c.npz", x=np.zeros((2, 3, 4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        load_images_for(str(tmp_path / "c.npz"), MEAN, STD, 4)
    np.savez(tmp_path / "y.npz", x=np.zeros((2, 4, 4, 3), np.uint8), y=np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="labels y must be 2 integers"):
        load_images_for(str(tmp_path / "y.npz"), MEAN, STD, 4)
    with pytest.raises(FileNotFoundError):
        load_images_for(str(tmp_path / "missing.npz"), MEAN, STD, 4)
    (tmp_path / "a.csv").write_text("1,2")
    with pytest.raises(ValueError, match="unsupported data file"):
        load_images_for(str(tmp_path / "a.csv"), MEAN, STD, 4)


def test_gray_npz_is_replicated_to_rgb(tmp_path):
    np.savez(tmp_path / "g.npz", x=np.full((2, 4, 4), 255, np.uint8))
    x, y = load_images_for(str(tmp_path / "g.npz"), MEAN, STD, 4).take([0, 1])
    assert y is None and x.shape == (2, 3, 4, 4)
    assert torch.allclose(x[:, 2], torch.full((2, 4, 4), (1 - 0.3) / 0.3))


def _png(path, value, size=(10, 12)):
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def test_image_folder_and_flat_png_folder(tmp_path):
    for c, v in (("cat", 10), ("dog", 200)):
        (tmp_path / "tree" / c).mkdir(parents=True)
        _png(tmp_path / "tree" / c / "a.png", v)
        _png(tmp_path / "tree" / c / "b.jpg", v)
    data = load_images_for(str(tmp_path / "tree"), MEAN, STD, 8)
    assert data.n == 4 and data.labels.tolist() == [0, 0, 1, 1]
    x, _ = data.take([3])
    assert x.shape == (1, 3, 8, 8)
    assert torch.allclose(x[0, 0], torch.full((8, 8), (200 / 255 - 0.5) / 0.2), atol=1e-5)

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        _png(flat / f"{i:05d}.png", 50 * i, (8, 8))
    assert load_images_for(str(flat), MEAN, STD, 8).labels is None
    (flat / "labels.txt").write_text("2\n0\n1\n")
    assert load_images_for(str(flat), MEAN, STD, 8).labels.tolist() == [2, 0, 1]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_images_for(str(tmp_path / "empty"), MEAN, STD, 8)


def test_tensor_file_renormalizes_to_the_model(tmp_path):
    pixels = torch.rand(4, 3, 8, 8)
    m0, s0 = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1), torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)
    torch.save({"images": (pixels - m0) / s0, "labels": torch.arange(4), "mean": m0.flatten(),
                "std": s0.flatten()}, tmp_path / "imgs.pt")
    x, y = load_images_for(str(tmp_path / "imgs.pt"), MEAN, STD, 8).take(range(4))
    want = (pixels - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.allclose(x, want, atol=1e-5) and y.tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="the model takes 16x16"):
        load_images_for(str(tmp_path / "imgs.pt"), MEAN, STD, 16)


def test_resize_center_geometry():
    x = torch.arange(64.0).view(1, 1, 8, 8)
    assert torch.equal(resize_center(x, 8), x)
    assert resize_center(torch.rand(1, 3, 300, 400), 224).shape == (1, 3, 224, 224)
    assert resize_center(torch.rand(1, 3, 20, 30), 32).shape == (1, 3, 32, 32)


def test_subsets_are_seeded():
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    idx = one_per_class(labels, 2, seed=1)
    assert sorted(labels[idx].tolist()) == [0, 0, 1, 1, 2, 2]
    assert torch.equal(idx, one_per_class(labels, 2, seed=1))
    assert random_subset(10, 4, 0).tolist() == random_subset(10, 4, 0).tolist()
    with pytest.raises(ValueError, match="asked for 11"):
        random_subset(10, 11)


def test_real_cifar_npz(shared_data):
    data = load_images_for(str(shared_data / "cifar10_test_exact1017.npz"), MEAN, STD, 32)
    assert data.n == 1017 and data.labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]

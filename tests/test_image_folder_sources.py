"""Folder data sources as ImageNet models read them: a folder with labels.csv, an ImageFolder with a class list,
class-index selection, the standard eval resize (short side to size / crop_pct, centre crop), lazy reading, the
errors, and `zsq-fast eval` on such a folder end to end."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SHARED_DATA, write_tiny_digits
from zsq_fast import data as zdata
from zsq_fast.cli import main
from zsq_fast.data import load_images_for, parse_classes, resize_center

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _img(path, value, size=(20, 14)):
    """A constant image; `value` is the red channel, green and blue fixed."""
    a = np.zeros((size[1], size[0], 3), np.uint8)
    a[..., 0], a[..., 1], a[..., 2] = value, 100, 200
    Image.fromarray(a).save(path, quality=100) if str(path).endswith(".jpg") else Image.fromarray(a).save(path)


def _labelled_folder(root, classes=(0, 2, 4, 6, 8, 10), sub="images"):
    (root / sub).mkdir(parents=True, exist_ok=True)
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "class_index", "wnid", "name"])
        for c in classes:
            name = f"n{c:08d}_c{c}.{'jpg' if c % 4 else 'png'}"
            _img(root / sub / name, 10 * c, (20 + c, 14))
            w.writerow([name, c, f"n{c:08d}", f"c{c}"])
    return root


def test_labels_csv_folder_reads_labels_and_pixels(tmp_path):
    d = _labelled_folder(tmp_path / "sample")  # files under images/, as the shared ImageNet sample
    data = load_images_for(str(d), MEAN, STD, 8)
    assert data.n == 6 and data.labels.tolist() == [0, 2, 4, 6, 8, 10] and data.source.startswith("labelled folder")
    x, y = data.take([0, 5])
    assert x.shape == (2, 3, 8, 8) and y.tolist() == [0, 10]
    want = torch.tensor([0.0, 100 / 255, 200 / 255]).sub(0.5).div(0.25)  # class 0: red 0, PNG (lossless)
    assert torch.allclose(x[0].mean((1, 2)), want, atol=1e-5)
    flat = _labelled_folder(tmp_path / "flat", (3, 1), sub="")  # files beside labels.csv
    assert load_images_for(str(flat), MEAN, STD, 8).labels.tolist() == [3, 1]


def test_image_folder_keeps_indices_of_a_class_list(tmp_path):
    root = tmp_path / "tree"
    for wnid, v in (("n003", 30), ("n001", 10)):
        (root / wnid).mkdir(parents=True)
        _img(root / wnid / "a.png", v)
        _img(root / wnid / "b.png", v)
    assert load_images_for(str(root), MEAN, STD, 8).labels.tolist() == [0, 0, 1, 1]  # sorted folder order
    (root / "wnids.txt").write_text("n000\nn001\nn002\nn003\n")
    data = load_images_for(str(root), MEAN, STD, 8)
    assert data.labels.tolist() == [1, 1, 3, 3]  # a subset of classes keeps the standard indices
    assert data.select_classes("3").n == 2


def test_class_selection():
    keep, text = parse_classes("%4=0")
    assert [c for c in range(12) if keep(c)] == [0, 4, 8] and text == "%4=0"
    keep, _ = parse_classes("%4!=0")
    assert [c for c in range(0, 12, 2) if keep(c)] == [2, 6, 10]
    keep, _ = parse_classes("1, 5-7,%10=9")
    assert [c for c in range(20) if keep(c)] == [1, 5, 6, 7, 9, 19]
    assert [c for c in range(5) if parse_classes([4, 1])[0](c)] == [1, 4]
    assert parse_classes(lambda c: c > 3)[0](4)
    for bad in ("%0=0", "a", "4-", "%4<0", ""):
        with pytest.raises(ValueError, match="bad class selection"):
            parse_classes(bad)
    with pytest.raises(TypeError, match="classes must be"):
        parse_classes(3.5)


def test_selection_on_a_source_splits_it(tmp_path):
    d = _labelled_folder(tmp_path / "s", classes=tuple(range(0, 16, 2)))
    calib = load_images_for(str(d), MEAN, STD, 8, classes="%4=0")
    rest = load_images_for(str(d), MEAN, STD, 8, classes="%4!=0", limit=3)
    assert calib.labels.tolist() == [0, 4, 8, 12] and rest.labels.tolist() == [2, 6, 10]
    assert "classes %4=0 (4 images)" in calib.source
    whole = load_images_for(str(d), MEAN, STD, 8)
    assert torch.equal(calib.take([1])[0], whole.take([2])[0])  # class 4 is row 2 of the folder
    with pytest.raises(ValueError, match="no image of .* is in classes 99"):
        whole.select_classes("99")
    np.savez(tmp_path / "nolabels.npz", x=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="has no labels: cannot select classes %2=0"):
        load_images_for(str(tmp_path / "nolabels.npz"), MEAN, STD, 4, classes="%2=0")


def test_eval_resize_matches_torchvision_pil_transform():
    from torchvision import transforms as T

    rng = np.random.default_rng(0)
    # smooth content (a blurred random field), as photos are: the two resamplers agree there to about 1/255
    a = np.asarray(Image.fromarray(rng.integers(0, 256, (37, 50, 3), dtype=np.uint8)).resize((100, 74)).resize((50, 37)))
    x = torch.from_numpy(a.copy()).permute(2, 0, 1)[None].float() / 255
    for size, crop_pct, mode in ((16, 0.875, "bicubic"), (20, 0.95, "bilinear"), (16, 0.875, "bilinear")):
        interp = T.InterpolationMode.BICUBIC if mode == "bicubic" else T.InterpolationMode.BILINEAR
        ref = T.Compose([T.Resize(int(size / crop_pct), interpolation=interp), T.CenterCrop(size), T.ToTensor()])(
            Image.fromarray(a))
        got = resize_center(x, zdata.Geometry(size, crop_pct, mode))[0]
        assert got.shape == ref.shape and (got - ref).abs().mean() < 0.01, (size, mode)
    squashed = resize_center(x, zdata.Geometry(16, 0.5, "bilinear", "squash"))
    assert squashed.shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="interpolation must be"):
        zdata.Geometry(16, 0.875, "lanczos")


def test_folder_is_read_lazily(tmp_path, monkeypatch):
    d = _labelled_folder(tmp_path / "s")
    data = load_images_for(str(d), MEAN, STD, 8, classes="%4=0")
    reads = []
    real = zdata._read_image
    monkeypatch.setattr(zdata, "_read_image", lambda p: reads.append(p) or real(p))
    assert data[1].shape == (3, 8, 8) and len(reads) == 1 and reads[0].endswith("n00000004_c4.png")
    assert len(data.__getitems__([0, 2])) == 2 and len(reads) == 3


def test_bad_labelled_folders(tmp_path):
    d = _labelled_folder(tmp_path / "s")
    (d / "labels.csv").write_text("name,idx\nx.png,1\n")
    with pytest.raises(ValueError, match="needs a header with columns file and class_index.*found: name, idx"):
        load_images_for(str(d), MEAN, STD, 8)
    (d / "labels.csv").write_text("file,class_index\nn00000000_c0.png,zero\n")
    with pytest.raises(ValueError, match="line 2: class_index must be an integer, got 'zero'"):
        load_images_for(str(d), MEAN, STD, 8)
    (d / "labels.csv").write_text("file,class_index\nn00000000_c0.png,0\ngone.png,1\n")
    with pytest.raises(FileNotFoundError, match="1 of the 2 images .* are not in .*images .first: 'gone.png'"):
        load_images_for(str(d), MEAN, STD, 8)
    (d / "labels.csv").write_text("file,class_index\n")
    with pytest.raises(ValueError, match="lists no images"):
        load_images_for(str(d), MEAN, STD, 8)
    tree = tmp_path / "tree"
    (tree / "n009").mkdir(parents=True)
    _img(tree / "n009" / "a.png", 1)
    (tree / "classes.txt").write_text("n000\n")
    with pytest.raises(ValueError, match="1 class folders of .* are not in classes.txt .first: 'n009'"):
        load_images_for(str(tree), MEAN, STD, 8)


def test_cli_eval_on_a_labelled_folder(tmp_path, capsys):
    write_tiny_digits(tmp_path, 4)
    d = _labelled_folder(tmp_path / "sample", classes=tuple(range(10)))
    report = tmp_path / "r.json"
    argv = ["eval", "--model", "digits_cnn", "--weights", str(tmp_path / "w.pt"), "--data", str(d), "--classes",
            "%2=1", "--device", "cpu", "--no-progress", "--report", str(report)]
    assert main(argv) == 0
    assert "5 images | float: top1" in capsys.readouterr().out
    r = json.loads(report.read_text())
    from zsq_fast.evaluate import evaluate
    from zsq_fast.models.zoo import load_model

    want = evaluate(load_model("digits_cnn", str(tmp_path / "w.pt")), str(d), classes="%2=1")
    assert r["metrics"]["float"]["top1"] == want["top1"] and r["metrics"]["data"]["n"] == 5
    assert "classes %2=1" in r["metrics"]["data"]["source"]
    argv[argv.index("%2=1")] = "%2=x"
    assert main(argv) == 2
    assert "bad class selection '%2=x'" in capsys.readouterr().err


@pytest.mark.skipif(not (SHARED_DATA / "imagenet_sample" / "labels.csv").exists(), reason="no ImageNet sample")
def test_shared_imagenet_sample_layout():
    data = load_images_for(str(SHARED_DATA / "imagenet_sample"), (0.5,) * 3, (0.5,) * 3, 224, crop_pct=0.875,
                           interpolation="bicubic")
    assert data.n == 500 and data.labels.tolist() == list(range(0, 1000, 2))
    calib, rest = data.select_classes("%4=0"), data.select_classes("%4!=0")
    assert calib.n == rest.n == 250 and set(calib.labels.tolist()).isdisjoint(rest.labels.tolist())
    assert calib.take([0])[0].shape == (1, 3, 224, 224)
